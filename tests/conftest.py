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
