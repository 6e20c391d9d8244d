"""Shared fixtures: one Prefect test harness per session, tiny pipeline configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Overrides that shrink the demo pipeline to seconds per stage; the code paths are the real ones.
TINY = [
    "sft.max_steps=8", "sft.logging_steps=4",
    "reward.max_steps=8", "reward.logging_steps=4", "reward.normalize_samples=16",
    "reward.max_new_tokens=16",
    "policy.ppo.total_episodes=32", "policy.ppo.batch_size=16", "policy.ppo.mini_batch_size=8",
    "policy.ppo.ppo_epochs=1", "policy.ppo.max_new_tokens=12",
    "evaluate.max_prompts=6", "evaluate.samples_per_prompt=2", "evaluate.max_new_tokens=12",
]


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_overrides(tmp_path):
    """TINY plus a private MLflow store and output folder under tmp_path."""
    return TINY + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                   f"output_dir={tmp_path}/runs"]


@pytest.fixture(scope="session")
def make_ctx(tmp_path_factory):
    """Factory: a real sqlite MLflow store with an experiment and a parent run, as a stage
    sees it (``TrackingContext``)."""
    from mlflow import MlflowClient

    from tasks.base import TrackingContext

    def make(name: str) -> TrackingContext:
        workdir = tmp_path_factory.mktemp(f"mlflow_{name}")
        uri = f"sqlite:///{workdir / 'mlflow.db'}"
        client = MlflowClient(uri)
        exp = client.create_experiment(name, artifact_location=str(workdir / "artifacts"))
        parent = client.create_run(exp, run_name="pipeline").info.run_id
        return TrackingContext(tracking_uri=uri, experiment_id=exp, parent_run_id=parent)

    return make


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory) -> str:
    """The demo base model with a fresh (seeded) scalar head and identity normalisation, saved
    as a reward-model directory: stands in for the reward stage's output."""
    import torch

    from models.loading import load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm

    out = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    tok = load_tokenizer("demo/base_model")
    rm = load_sequence_scorer("demo/base_model")
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    RewardNorm(1.0, 0.0, 1.0).save(out)
    return str(out)


def _head(src, dst, n: int) -> str:
    """Write the first ``n`` lines of ``src`` to ``dst``: a small slice of a demo dataset."""
    from pathlib import Path

    Path(dst).write_text("".join(Path(src).read_text().splitlines(keepends=True)[:n]))
    return str(dst)


@pytest.fixture(scope="session")
def head_file():
    return _head


# Real servers (moto S3, PostgreSQL, mlflow server) on free ports: see tests/servers.py.
from servers import mlflow_server, postgres, s3_server  # noqa: E402,F401
