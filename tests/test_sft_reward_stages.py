"""SFT and reward-model stages end to end on the demo model, a few steps each, real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tasks.base import BaseModelConfig, TrackingContext
from tasks.reward import RewardConfig, run_reward
from tasks.sft import SFTConfig, run_sft

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "base_model"
DEMO_DATA = REPO / "demo" / "data"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def ctx(make_ctx) -> TrackingContext:
    return make_ctx("stages")


def child_run(ctx: TrackingContext, run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    artifacts = [a.path for a in client.list_artifacts(run_id, "model")]
    return run, artifacts


@pytest.fixture(scope="module")
def sft_result(workdir, ctx, head_file):
    data = head_file(DEMO_DATA / "sft.jsonl", workdir / "sft.jsonl", 256)
    # Tiny-model settings (as configs/demo.yaml): the defaults are for ~0.5B models.
    cfg = SFTConfig(max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                    learning_rate=1e-3, max_length=128, logging_steps=4)
    return run_sft(cfg, base_model=BaseModelConfig(path=str(DEMO_MODEL)), data_uri=data,
                   out_dir=str(workdir / "sft"), seed=0, ctx=ctx)


@pytest.fixture(scope="module")
def rm_result(workdir, ctx, sft_result, head_file):
    cfg = RewardConfig(max_steps=12, per_device_train_batch_size=8, logging_steps=4,
                       learning_rate=5e-4, max_length=128, normalize_samples=8, max_new_tokens=8,
                       margin=True)
    return run_reward(
        cfg, sft_model_uri=sft_result.model_uri,
        train_uri=head_file(DEMO_DATA / "preferences.jsonl", workdir / "prefs.jsonl", 128),
        eval_uri=head_file(DEMO_DATA / "eval_pairs.jsonl", workdir / "eval_pairs.jsonl", 48),
        rl_prompts_uri=str(DEMO_DATA / "rl_prompts.jsonl"),
        out_dir=str(workdir / "rm"), seed=0, ctx=ctx)


def assert_all_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() <= after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not trained: {unchanged}"


def test_sft_stage_trains_saves_and_logs(sft_result, ctx):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL)
    tuned = AutoModelForCausalLM.from_pretrained(sft_result.model_uri)
    AutoTokenizer.from_pretrained(sft_result.model_uri)
    assert (Path(sft_result.model_uri) / "model.safetensors").exists()
    assert_all_changed(dict(base.named_parameters()), dict(tuned.named_parameters()))

    run, artifacts = child_run(ctx, sft_result.run_id)
    assert {"sft/train_loss", "sft/final_loss", "sft/eval_loss", "sft/loss"} <= run.data.metrics.keys()
    assert run.data.tags["data.sft.sha256"]
    assert run.data.params["max_steps"] == "12" and run.data.params["seed"] == "0"
    assert "model/model.safetensors" in artifacts and "model/tokenizer.json" in artifacts


def test_reward_stage_trains_calibrates_and_logs(rm_result, sft_result, ctx):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(rm_result.model_uri)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id is not None
    sft = AutoModelForCausalLM.from_pretrained(sft_result.model_uri)
    # Every backbone tensor moved away from the SFT weights it started from.
    sft_backbone = {k: v for k, v in sft.named_parameters() if k.startswith("transformer.")}
    assert_all_changed(sft_backbone, dict(rm.named_parameters()))

    calib = json.loads((Path(rm_result.model_uri) / "reward_calibration.json").read_text())
    assert calib["temperature"] > 0 and calib["std"] > 0
    assert 0.0 <= calib["eval_accuracy"] <= 1.0
    acc = rm_result.metrics["reward/eval_accuracy"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0

    run, artifacts = child_run(ctx, rm_result.run_id)
    for key in ("reward/eval_accuracy", "reward/temperature", "reward/ece_before",
                "reward/ece_after", "reward/eval_nll", "reward/loss"):
        assert key in run.data.metrics
    assert "model/reward_calibration.json" in artifacts
    assert "model/model.safetensors" in artifacts


def test_reward_norm_loads_from_stage_output(rm_result):
    from models.reward import RewardNorm

    norm = RewardNorm.load(rm_result.model_uri)
    assert norm.std > 0 and norm.temperature == rm_result.metrics["reward/temperature"]


def test_sft_reads_parquet(workdir, ctx):
    import pandas as pd

    rows = [json.loads(line) for line in (DEMO_DATA / "sft.jsonl").read_text().splitlines()[:32]]
    pd.DataFrame([{**r, "source": "extra column, dropped"} for r in rows]).to_parquet(
        workdir / "sft.parquet")
    result = run_sft(SFTConfig(max_steps=2, per_device_train_batch_size=4, eval_fraction=0.0,
                               gradient_accumulation_steps=1, max_length=128),
                     base_model=BaseModelConfig(path=str(DEMO_MODEL)),
                     data_uri=str(workdir / "sft.parquet"), out_dir=str(workdir / "sft_pq"),
                     seed=0, ctx=ctx)
    assert (Path(result.model_uri) / "model.safetensors").exists()
    assert result.num_train_examples == 32


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_sft_reads_conversational(workdir, ctx):
    from transformers import AutoTokenizer

    model_dir = workdir / "chat_base"
    shutil.copytree(DEMO_MODEL, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model_dir)
    rows = [json.loads(line) for line in (DEMO_DATA / "sft.jsonl").read_text().splitlines()[:32]]
    data = workdir / "chat.jsonl"
    data.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "completion": [{"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows))
    result = run_sft(SFTConfig(max_steps=2, per_device_train_batch_size=4, eval_fraction=0.0,
                               gradient_accumulation_steps=1, max_length=128),
                     base_model=BaseModelConfig(path=str(model_dir)), data_uri=str(data),
                     out_dir=str(workdir / "sft_chat"), seed=0, ctx=ctx)
    saved = AutoTokenizer.from_pretrained(result.model_uri)
    assert saved.chat_template == CHAT_TEMPLATE
