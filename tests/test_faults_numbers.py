"""Fault: NaN or inf in a loss, a reward or an advantage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tasks.gate import MAY_BE_NAN, GateConfig, decide

REPO = Path(__file__).resolve().parents[1]


class NaNAfter:
    """Reward normalisation that turns every score NaN from its ``n``-th call on (a reward
    model that starts emitting NaN mid-run, e.g. after an overflow)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return scores * math.nan if self.calls >= self.n else scores


def test_ppo_stops_naming_the_step_when_rewards_turn_nan(tiny_reward_dir, tmp_path):
    """Fault: the reward model's scores turn NaN at PPO step 2. Guarantee: training stops at
    step 2 with an error naming the step and the non-finite rewards/advantages; the checkpoint
    still holds step 1 (the poisoned update is never saved, so a re-run cannot resume from it)."""
    from tasks.ppo import PPOConfig, _load_prompts, build_models
    from tasks.ppo_trainer import NonFiniteError, train_ppo

    cfg = PPOConfig(total_episodes=24, batch_size=8, mini_batch_size=8, ppo_epochs=1,
                    max_new_tokens=6, checkpoint_every=1)
    models = build_models(cfg, "demo/base_model", tiny_reward_dir, torch.device("cpu"))
    models.reward_norm = NaNAfter(2)
    prompts = _load_prompts("demo/data/rl_prompts.jsonl", models.tokenizer, 32)[:16]
    ckpt = tmp_path / "ppo.pt"
    with pytest.raises(NonFiniteError, match=r"non-finite scores .*advantages.* at step 2"):
        train_ppo(cfg, models, prompts=prompts, seed=0, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=False)["step"] == 1


@pytest.fixture(scope="module")
def nan_base_model(tmp_path_factory) -> str:
    """The demo base model with its token embeddings NaN (a corrupt checkpoint): every loss
    computed from it is NaN."""
    from models.loading import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("nan_model")
    model = load_causal_lm("demo/base_model")
    model.get_input_embeddings().weight.data.fill_(math.nan)
    model.save_pretrained(out)
    load_tokenizer("demo/base_model").save_pretrained(out)
    return str(out)


def test_nan_loss_fails_the_pipeline_at_sft_and_nothing_is_registered(
        prefect_harness, tiny_overrides, tmp_path, nan_base_model):
    """Fault: the SFT loss is NaN (a base model with NaN weights). Guarantee: the SFT stage
    fails naming the step and the non-finite loss (transformers' Trainer would log a NaN loss
    as the mean of the ones before it and train on); the pipeline run is FAILED with that
    error, no SFT output folder exists, and the registry holds no version: the gate never ran,
    so it cannot have promoted."""
    from mlflow import MlflowClient

    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline
    from tasks.durable import NonFiniteLoss

    cfg = load_config("configs/demo.yaml", tiny_overrides + [
        f"base_model.path={nan_base_model}", "sft.logging_steps=1"])
    with pytest.raises(NonFiniteLoss, match=r"sft: non-finite loss = nan.* at step 1"):
        rlhf_pipeline(cfg)
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs["demo-pipeline"].info.status == "FAILED"
    assert "at step 1" in runs["demo-pipeline"].data.tags["rlhf.error"]
    assert "policy" not in runs and "gate" not in runs
    assert not [p for p in Path(cfg.output_dir, cfg.name).glob("sft-*") if p.is_dir()
                and not p.name.endswith(".checkpoints")]
    assert client.search_registered_models() == []


# The gate's half: a run whose metrics hold a NaN or inf is never promoted, whichever metric.
GOOD = {"reward/longer_preferred": 0.6, "reward/eval_accuracy": 0.8,
        "reward/heldout/longer_preferred": 0.55} | {f"eval/{k}": v for k, v in {
    "win_rate": 0.9, "win_rate_lo": 0.8, "win_rate_hi": 0.97, "matched_win_rate": 0.85,
    "matched_pairs": 300, "win_rate_heldout_rm": 0.9, "heldout_rm_length_corr": 0.3,
    "win_rate_rm": 1.0, "kl_policy_sft": 3.0, "gold_policy": 0.8, "gold_sft": 0.1,
    "len_policy": 13.0, "len_sft": 10.0, "repetition_policy": 0.02, "repetition_sft": 0.01,
    "ppl_policy": 12.0, "ppl_sft": 10.0, "ppl_champion": 11.0, "reward_policy": 1.2,
    "champion/win_rate": 0.7, "champion/win_rate_lo": 0.55, "champion/win_rate_hi": 0.82,
}.items()}


@pytest.mark.parametrize("key", sorted(k for k in GOOD if not any(p in k for p in MAY_BE_NAN)))
def test_gate_never_promotes_a_non_finite_metric(key):
    """Fault: NaN, +inf or -inf in any reward or evaluation metric the gate reads.
    Guarantee: the gate refuses, and a FAIL reason names the metric."""
    assert decide(GOOD, GateConfig()).promote
    for bad in (math.nan, math.inf, -math.inf):
        d = decide({**GOOD, key: bad}, GateConfig())
        assert not d.promote, (key, bad)
        assert any(key in r for r in d.reasons if r.startswith("FAIL")), (key, bad, d.reasons)
