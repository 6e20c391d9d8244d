"""The whole pipeline end to end on a tiny config, under a Prefect test harness."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from flows.config import load_config
from tasks.validation import DataValidationError


def _runs(client, exp_name):
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], max_results=100)


def _weights(path):
    return load_file(f"{path}/model.safetensors")


# Thresholds any trained policy passes: these tests are about the plumbing, not quality.
PLUMBING = ["gate.min_win_rate=0.0", "gate.min_win_rate_lower=0.0", "gate.max_kl=1e9",
            "gate.min_gold_gain=-100", "gate.max_longer_preferred=1.0",
            "gate.max_repetition_increase=1.0", "gate.max_perplexity_increase=1e9",
            "gate.max_perplexity_increase_vs_sft=1e9", "gate.max_reward_divergence=1.0",
            "registry.auto_production=true"]


def test_pipeline_promotes_and_tracks_everything(prefect_harness, tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    from flows.pipeline import rlhf_pipeline

    cfg = load_config("configs/demo.yaml", tiny_overrides + PLUMBING)
    summary = rlhf_pipeline(cfg)
    assert summary.result == "promoted"

    client = MlflowClient(summary.tracking_uri)
    runs = _runs(client, cfg.tracking.experiment)
    parent = [r for r in runs if r.info.run_id == summary.parent_run_id][0]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"validation", "sft", "reward", "policy", "evaluate", "gate"}
    for name in ("sft", "reward", "policy"):
        run = children[name]
        assert run.data.params["seed"] == "0"
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
        assert "model/model.safetensors" in arts and "model/tokenizer.json" in arts, name
    assert children["policy"].data.tags["rlhf.algorithm"] == "ppo"
    ppo = children["policy"].data.metrics
    for key in ("ppo/objective/kl", "ppo/objective/kl_coef", "ppo/objective/scores",
                "ppo/policy/clipfrac", "ppo/policy/entropy", "ppo/loss/value"):
        assert key in ppo, key
    assert len(client.get_metric_history(children["policy"].info.run_id, "ppo/objective/kl")) == 2
    ev = children["evaluate"].data.metrics
    assert 0.0 <= ev["eval/win_rate"] <= 1.0 and "eval/kl_policy_sft" in ev
    assert 0.0 < ev["eval/rm_pref_prob"] < 1.0
    assert children["gate"].data.metrics["gate/promoted"] == 1.0
    assert parent.data.metrics["gate/promoted"] == 1.0
    assert parent.data.metrics["eval/win_rate"] == ev["eval/win_rate"]

    # Every stage changed parameters: base -> SFT -> policy.
    policy_w = _weights(summary.policy_uri)
    lineage = json.loads(open(f"{summary.policy_uri}/rlhf_lineage.json").read())
    sft_w = _weights(lineage["sft_model"])
    base_w = _weights("demo/base_model")
    for name, w in sft_w.items():
        assert not torch.equal(w, base_w[name]), f"SFT did not change {name}"
        assert not torch.equal(policy_w[name], w), f"PPO did not change {name}"

    # Registered as the candidate, promoted to staging and (auto_production) production, with
    # lineage tags; the version serves an MLflow Model logged from the policy run.
    reg = summary.registration
    assert reg.policy_version == summary.candidate.policy_version
    mv = client.get_model_version_by_alias(cfg.registry.policy_name, "production")
    assert str(mv.version) == reg.policy_version
    assert set(client.get_model_version(mv.name, mv.version).aliases) == {
        "candidate", "staging", "production"}
    assert mv.run_id == children["policy"].info.run_id and mv.source.startswith("models:/m-")
    assert mv.tags["rlhf.parent_run_id"] == parent.info.run_id
    assert mv.tags["rlhf.sft_run_id"] == children["sft"].info.run_id
    assert mv.tags["data.preferences.sha256"]
    assert mv.tags["rlhf.reward_model"] == f"{cfg.registry.reward_name}/{reg.reward_version}"
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert report == {"report/report.md", "report/report.html", "report/training_curves.png"}

    # A second candidate (another seed) is evaluated against that production version too.
    second = load_config("configs/demo.yaml", tiny_overrides + [
        *PLUMBING, "seed=1", "gate.min_champion_win_rate_lower=0.0"])
    again = rlhf_pipeline(second)
    assert 0.0 <= again.metrics["eval/champion/win_rate"] <= 1.0
    assert again.metrics["eval/champion/win_rate_lo"] <= again.metrics["eval/champion/win_rate"]
    assert any("win rate vs production" in r for r in again.decision.reasons)
    assert again.result == "promoted" and again.registration.policy_version != reg.policy_version
    # Unchanged re-run: the candidate is the production version, nothing to beat, no new version.
    rerun = rlhf_pipeline(second)
    assert rerun.candidate.reused and rerun.candidate.policy_version == again.candidate.policy_version
    assert not any(k.startswith("eval/champion/") for k in rerun.metrics)


def test_pipeline_refusal_is_recorded(prefect_harness, tiny_overrides):
    from mlflow import MlflowClient

    from flows.pipeline import rlhf_pipeline

    cfg = load_config("configs/demo.yaml", tiny_overrides + ["gate.min_win_rate=1.01"])
    summary = rlhf_pipeline(cfg)
    assert summary.result == "feedback_round_needed"
    assert any(r.startswith("FAIL: win rate") for r in summary.decision.reasons)
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags["rlhf.result"] == "feedback_round_needed"
    gate = [r for r in _runs(client, cfg.tracking.experiment) if r.info.run_name == "gate"][0]
    assert gate.data.metrics["gate/promoted"] == 0.0
    assert "FAIL: win rate" in gate.data.tags["gate.reasons"]
    # The refused policy is registered as the candidate, and nothing more.
    assert summary.registration is None
    aliases = client.get_registered_model(cfg.registry.policy_name).aliases
    assert {a: str(v) for a, v in aliases.items()} == {
        "candidate": summary.candidate.policy_version}


def test_malformed_input_stops_before_training(prefect_harness, tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    from flows.pipeline import rlhf_pipeline

    bad = tmp_path / "prefs.jsonl"
    shutil.copy("demo/data/preferences.jsonl", bad)
    with bad.open("a") as f:
        f.write('{"prompt": "The film is", "chosen": " great.", "rejected": " great."}\n')
    before = bad.read_bytes()
    cfg = load_config("configs/demo.yaml", tiny_overrides + [f"data.preferences={bad}"])
    with pytest.raises(DataValidationError) as err:
        rlhf_pipeline(cfg)
    assert str(bad) in str(err.value) and "row 3001" in str(err.value)
    assert bad.read_bytes() == before
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = _runs(client, cfg.tracking.experiment)
    assert {r.info.run_name for r in runs} <= {"demo-pipeline", "validation"}
    assert [r.info.status for r in runs if r.info.run_name == "demo-pipeline"] == ["FAILED"]
    assert client.search_registered_models() == []
