"""DPO, GRPO and RLOO through ``run_policy``: a few steps each on the demo model, real MLflow store.

The demo base model stands in for the SFT policy, and (with a fresh scalar head) for the reward
model: the point is the plumbing (data, reward function, KL, saving, logging), not learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.base import TrackingContext
from tasks.dpo import DPOSettings
from tasks.policy import PolicyConfig, run_policy
from tasks.trl_online import GRPOSettings, RewardModelScore, RLOOSettings

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "base_model"
DEMO_DATA = REPO / "demo" / "data"

# A few optimizer steps on a few short samples: each run takes seconds. Learning rates and
# lengths for a tiny model, as in configs/demo.yaml (the defaults are for ~0.5B models).
ONLINE_TINY = dict(max_steps=2, per_device_train_batch_size=8, steps_per_generation=1,
                   num_generations=4, num_iterations=1, max_completion_length=8, logging_steps=1,
                   learning_rate=3e-4, max_prompt_length=32)
TINY = {
    "dpo": PolicyConfig(algorithm="dpo", dpo=DPOSettings(max_steps=3, per_device_train_batch_size=8,
                                                         learning_rate=1e-4, beta=0.5,
                                                         max_length=64, logging_steps=1)),
    "grpo": PolicyConfig(algorithm="grpo", grpo=GRPOSettings(**ONLINE_TINY)),
    "rloo": PolicyConfig(algorithm="rloo", rloo=RLOOSettings(**ONLINE_TINY)),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("policy_algorithms")


@pytest.fixture(scope="module")
def ctx(make_ctx) -> TrackingContext:
    return make_ctx("policy")


@pytest.fixture(scope="module")
def reward_dir(tiny_reward_dir) -> str:
    return tiny_reward_dir


@pytest.fixture(scope="module")
def start_weights() -> dict[str, torch.Tensor]:
    from models.loading import load_causal_lm

    return {k: v.clone() for k, v in load_causal_lm(str(DEMO_MODEL)).state_dict().items()}


@pytest.mark.parametrize("algorithm", ["dpo", "grpo", "rloo"])
def test_algorithm_trains_saves_and_logs(algorithm, workdir, ctx, reward_dir, start_weights,
                                         head_file):
    from mlflow import MlflowClient

    from models.loading import load_causal_lm

    result = run_policy(
        TINY[algorithm], sft_model_uri=str(DEMO_MODEL), reward_model_uri=reward_dir,
        prompts_uri=head_file(DEMO_DATA / "rl_prompts.jsonl", workdir / "prompts.jsonl", 32),
        preferences_uri=head_file(DEMO_DATA / "preferences.jsonl", workdir / "prefs.jsonl", 32),
        out_dir=str(workdir / algorithm), seed=0, ctx=ctx)

    assert result.stage == "policy" and result.algorithm == algorithm
    assert result.model_uri == str(workdir / algorithm / "policy")
    assert result.stop_reason is None
    assert result.steps == result.planned_steps > 0
    lineage = json.loads((Path(result.model_uri) / "rlhf_lineage.json").read_text())
    assert lineage["sft_model"] == str(DEMO_MODEL) and lineage["algorithm"] == algorithm

    # The saved policy loads, and training moved every weight matrix.
    after = load_causal_lm(result.model_uri).state_dict()
    assert (Path(result.model_uri) / "model.safetensors").exists()
    changed = [k for k in start_weights if not torch.equal(start_weights[k], after[k])]
    unchanged = sorted(set(start_weights) - set(changed))
    assert not unchanged, f"{algorithm}: parameters not trained: {unchanged}"

    client = MlflowClient(ctx.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "policy" and run.data.tags["rlhf.algorithm"] == algorithm
    assert run.data.tags["mlflow.parentRunId"] == ctx.parent_run_id
    assert run.data.params["seed"] == "0"
    assert f"{algorithm}/steps" in run.data.metrics
    if algorithm == "dpo":
        assert "dpo/rewards/margins" in run.data.metrics
    else:
        assert run.data.params["beta"] == "0.05"
        for name in ("objective/kl", "objective/scores", "loss"):
            assert f"{algorithm}/{name}" in run.data.metrics, sorted(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "model")]
    assert "model/model.safetensors" in artifacts


def test_reward_function_matches_score_sequences(reward_dir):
    """The TRL reward callable scores prompt + completion ids like the PPO stage does."""
    from models.loading import load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm, score_sequences

    tokenizer = load_tokenizer(str(DEMO_MODEL))
    rm = load_sequence_scorer(reward_dir).eval()
    norm = RewardNorm(1.0, 0.5, 2.0)
    fn = RewardModelScore(rm, norm, tokenizer, missing_eos_penalty=1.0)
    prompts = ["The plot of this film was", "The ending of this game was"]
    eos = tokenizer.eos_token_id
    completions = [tokenizer(" great.", add_special_tokens=False)["input_ids"] + [eos],
                   tokenizer(" dull and", add_special_tokens=False)["input_ids"]]  # no EOS: penalised
    got = fn(prompts=prompts, completions=["", ""], completion_ids=completions)

    expected = []
    for p, c, penalty in zip(prompts, completions, (0.0, 1.0)):
        ids = torch.tensor([tokenizer(p)["input_ids"] + c])
        with torch.no_grad():
            raw = score_sequences(rm, ids, torch.ones_like(ids))
        expected.append(float(norm.normalize(raw)[0]) - penalty)
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("settings", [GRPOSettings, RLOOSettings, DPOSettings])
def test_kl_coefficient_must_be_positive(settings):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="beta"):
        settings(beta=0.0)
