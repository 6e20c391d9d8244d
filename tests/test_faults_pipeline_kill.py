"""Fault: the whole pipeline process is SIGKILLed during reward-model training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sigkilled_pipeline_reruns_without_redoing_finished_stages(prefect_harness,
                                                                   tiny_overrides, tmp_path):
    """Fault: ``rlhf run`` is SIGKILLed while the reward model trains (its step-4 checkpoint
    of 8 on disk). Guarantee: the same command again redoes no finished stage (validation and
    SFT are reused from their records), resumes the reward model from checkpoint-4 (only
    steps 5-8 train again), and ends with every stage's planned step count (reward 8, PPO
    its planned updates), the reward stage's output whole and its checkpoints removed."""
    from mlflow import MlflowClient
    from prefect.settings import get_current_settings

    from flows.config import load_config
    from flows.pipeline import rlhf_pipeline

    overrides = tiny_overrides + ["reward.save_steps=4", "reward.logging_steps=1"]
    root = tmp_path / "runs" / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PREFECT_API_URL": str(get_current_settings().api.url)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "--config", "configs/demo.yaml"]
        + [a for o in overrides for a in ("--set", o)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt = time.monotonic() + 400, None
    try:
        while ckpt is None and time.monotonic() < deadline and proc.poll() is None:
            ckpt = next((p for p in root.glob("reward-*.checkpoints/checkpoint-4/trainer_state.json")
                         if re.fullmatch(r"reward-[0-9a-f]{12}\.checkpoints", p.parent.parent.name)),
                        None)
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt is not None, "the pipeline never reached the reward model's checkpoint-4"
    reward_dir = root / ckpt.parent.parent.name.removesuffix(".checkpoints")
    assert not (reward_dir / "result.json").exists()
    (sft_dir,) = [p for p in root.glob("sft-*") if not p.name.endswith(".checkpoints")]
    assert (sft_dir / "result.json").exists()  # SFT had finished before the kill

    again = rlhf_pipeline(load_config("configs/demo.yaml", overrides))
    client = MlflowClient(again.tracking_uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_run(again.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{again.parent_run_id}'")}
    reused = {s for s, r in runs.items() if "rlhf.reused_from" in r.data.tags}
    assert {"validation", "sft"} <= reused and "reward" not in reused and "policy" not in reused
    reward = runs["reward"]
    assert reward.data.tags["rlhf.resumed_from"].endswith("checkpoint-4")
    assert reward.data.metrics["reward/steps"] == 8
    assert [m.step for m in client.get_metric_history(reward.info.run_id, "reward/loss")] == [
        5, 6, 7, 8]
    policy = runs["policy"]
    assert policy.data.metrics["ppo/steps"] == load_config(
        "configs/demo.yaml", overrides).policy.ppo.total_episodes // 16  # batch_size 16 (TINY)
    assert (reward_dir / "model.safetensors").exists() and (reward_dir / "result.json").exists()
    assert not list(root.glob("reward-*.checkpoints"))
