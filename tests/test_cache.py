"""Content-addressed stages (tasks/cache.py): what enters a stage's key, and the pipeline
reusing exactly the stages whose key did not change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows.config import load_config
from tasks import cache
from tasks.base import TrackingContext
from tasks.policy import PolicyConfig

STAGES = ("validation", "sft", "reward", "policy", "evaluate", "gate")


# --- the key -------------------------------------------------------------------------------


def test_key_ignores_the_run_and_the_output_folder_but_not_file_contents(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    ctx = lambda run: TrackingContext(tracking_uri="sqlite://", experiment_id="1",  # noqa: E731
                                      parent_run_id=run)
    key = lambda **kw: cache.stage_key("sft", "tasks.sft", {"data_uri": str(data), "seed": 0,  # noqa: E731
                                                            **kw})
    first = key(ctx=ctx("run-1"), out_dir="a")
    assert first == key(ctx=ctx("run-2"), out_dir="b")
    assert first != key(ctx=ctx("run-1"), out_dir="a", seed=1)
    # The same bytes elsewhere are the same input; other bytes at the same path are not.
    copy = tmp_path / "copy.jsonl"
    shutil.copy(data, copy)
    assert cache.stage_key("sft", "tasks.sft", {"data_uri": str(copy), "seed": 0}) == first
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert key() != first


def test_directory_fingerprint_covers_names_and_bytes_but_not_the_result_record(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\x00" * 8)
    before = cache.fingerprint(str(model))
    (model / cache.RESULT_FILE).write_text("{}")
    assert cache.fingerprint(str(model)) == before
    (model / "tokenizer.json").write_text("{}")
    assert cache.fingerprint(str(model)) != before
    assert cache.fingerprint("Qwen/Qwen2.5-0.5B") == "uri:Qwen/Qwen2.5-0.5B"  # a hub id
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" * 20  # not a path
    assert cache.fingerprint(template) == f"uri:{template}"


def test_base_model_is_keyed_by_its_files_and_its_chat_template_file(tmp_path):
    from tasks.base import BaseModelConfig

    model = tmp_path / "base"
    shutil.copytree("demo/base_model", model)
    template = tmp_path / "chat.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    key = lambda: cache.key_inputs({"base_model": BaseModelConfig(  # noqa: E731
        path=str(model), chat_template=str(template))})
    first = key()
    template.write_text("{{ messages[-1]['content'] }}")
    second = key()
    assert second != first
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert key() != second


def test_policy_key_covers_only_the_chosen_algorithm():
    ppo = PolicyConfig()
    edited_dpo = PolicyConfig.model_validate({"dpo": {"beta": 0.5}})
    assert ppo.key_dump() == edited_dpo.key_dump()
    edited_ppo = PolicyConfig.model_validate({"ppo": {"learning_rate": 1e-4}})
    assert ppo.key_dump() != edited_ppo.key_dump()
    assert ppo.key_dump() != PolicyConfig(algorithm="dpo").key_dump()


def test_gold_judge_code_keys_the_evaluation():
    from tasks.evaluate import EvaluateConfig

    judged = cache.key_inputs({"cfg": EvaluateConfig(gold_judge="demo.judge:score")})["cfg"]
    assert judged["code:demo.judge"] == cache.code_version("demo.judge")
    assert not any(k.startswith("code:") for k in cache.key_inputs({"cfg": EvaluateConfig()})["cfg"])


def test_code_version_follows_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("def run():\n    from pkg.helper import f\n    return f()\n")
    (pkg / "helper.py").write_text("def f():\n    return 1\n")
    (pkg / "other.py").write_text("X = 1\n")
    monkeypatch.setattr(cache, "PROJECT_ROOT", tmp_path)

    def version() -> str:
        cache._module_source.cache_clear()
        cache.code_version.cache_clear()
        return cache.code_version("pkg.stage")

    first = version()
    (pkg / "other.py").write_text("X = 2\n")  # not imported by the stage
    assert version() == first
    (pkg / "helper.py").write_text("def f():\n    return 2\n")
    assert version() != first
    cache._module_source.cache_clear()
    cache.code_version.cache_clear()


def test_sft_code_version_covers_what_sft_imports():
    deps, todo = set(), ["tasks.sft"]
    while todo:
        name = todo.pop()
        if name in deps or cache._module_file(name) is None:
            continue
        deps.add(name)
        todo += cache._module_source(name)[1]
    assert {"tasks.sft", "tasks.base", "tasks.tracking", "models.loading", "dataio.read"} <= deps
    assert "tasks.evaluate" not in deps and "tasks.ppo" not in deps


# --- the pipeline --------------------------------------------------------------------------


def _stage_runs(client, summary) -> dict[str, object]:
    """The child runs of one pipeline run, by stage."""
    parent = client.get_run(summary.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{summary.parent_run_id}'")
    return {r.info.run_name: r for r in runs}


def _reused(runs) -> set[str]:
    return {stage for stage, r in runs.items() if "rlhf.reused_from" in r.data.tags}


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.suffix in (".safetensors", ".json", ".pt")}


def test_rerun_reuses_exactly_the_unchanged_stages(prefect_harness, tiny_overrides, tmp_path):
    from mlflow import MlflowClient

    from flows.pipeline import rlhf_pipeline

    cfg = load_config("configs/demo.yaml", tiny_overrides)
    first = rlhf_pipeline(cfg)
    client = MlflowClient(first.tracking_uri)
    first_runs = _stage_runs(client, first)
    assert set(first_runs) == set(STAGES) and not _reused(first_runs)
    root = Path(cfg.output_dir) / cfg.name
    for stage in STAGES:
        folders = list(root.glob(f"{stage}-*/{cache.RESULT_FILE}"))
        assert len(folders) == 1, stage
        assert first_runs[stage].data.tags["rlhf.cache_key"][:12] in folders[0].parent.name
    written = _mtimes(root)
    versions = len(client.search_model_versions(f"name='{cfg.registry.policy_name}'"))

    # Unchanged: every stage reused (nothing written, nothing trained), no new version.
    again = rlhf_pipeline(cfg)
    runs = _stage_runs(client, again)
    assert _reused(runs) == set(STAGES)
    for stage in STAGES:
        earlier = first_runs[stage].info.run_id
        assert runs[stage].data.tags["rlhf.reused_from"] == earlier
        assert client.get_run(again.parent_run_id).data.tags[f"rlhf.reused.{stage}"] == earlier
    # The reused run carries the earlier run's headline metrics (its curves stay there).
    headline = runs["sft"].data.metrics
    assert "sft/train_loss" in headline and headline.items() <= first_runs["sft"].data.metrics.items()
    assert _mtimes(root) == written
    assert again.reused == {stage: first_runs[stage].info.run_id for stage in STAGES}
    assert again.candidate.reused
    assert again.candidate.policy_version == first.candidate.policy_version
    assert len(client.search_model_versions(f"name='{cfg.registry.policy_name}'")) == versions
    assert again.metrics == first.metrics

    # Only evaluate.*: evaluation and the gate run again, on the same registered version.
    fewer = load_config("configs/demo.yaml", tiny_overrides + ["evaluate.max_prompts=4"])
    evaluated = rlhf_pipeline(fewer)
    runs = _stage_runs(client, evaluated)
    assert _reused(runs) == {"validation", "sft", "reward", "policy"}
    assert evaluated.metrics["eval/num_prompts"] == 4
    assert evaluated.candidate.policy_version == first.candidate.policy_version

    # reward.*: the reward model and everything after it; validation and SFT are reused.
    other_rm = load_config("configs/demo.yaml", tiny_overrides + ["reward.learning_rate=1e-3"])
    retrained = rlhf_pipeline(other_rm)
    runs = _stage_runs(client, retrained)
    assert _reused(runs) == {"validation", "sft"}
    assert retrained.sft_model_uri == first.sft_model_uri
    assert retrained.reward_model_uri != first.reward_model_uri
    assert retrained.policy_uri != first.policy_uri

    # A record that does not parse (the stage killed while Prefect wrote it) is no record:
    # the stage runs again in its folder (PPO resumes from its final checkpoint), writes the
    # same weights, so evaluation is reused; the gate sees a new policy run and runs again.
    record = Path(first.policy_uri).parent / cache.RESULT_FILE
    record.write_text(record.read_text()[:40])
    resumed = rlhf_pipeline(cfg)
    runs = _stage_runs(client, resumed)
    assert _reused(runs) == {"validation", "sft", "reward", "evaluate"}
    assert resumed.policy_uri == first.policy_uri and os.path.getsize(record) > 40
