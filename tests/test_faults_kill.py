"""Fault: SIGKILL during SFT training, the stage alone, compared with an uninterrupted run.

The reward model's kill is tested through the whole pipeline (test_faults_pipeline_kill.py:
resumed from its checkpoint, finished stages reused), PPO's in test_ppo_resume.py. The worker
runs either stage (``tests/stage_resume_worker.py sft|reward``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(REPO / "tests" / "stage_resume_worker.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def weights(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))


def kill_after_checkpoint(args: list[str], step: int, timeout: float = 240) -> None:
    """Start the worker, wait until it has saved the checkpoint at ``step``, SIGKILL it (no
    cleanup, as with an OOM kill or a preempted node)."""
    proc = subprocess.Popen(WORKER + args + [str(step)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            if line.strip() == f"saved {step}" or time.monotonic() > deadline:
                break
        assert line.strip() == f"saved {step}", "the worker never reached its checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage", ["sft"])
def test_sigkill_mid_training_then_rerun_resumes_from_checkpoint(stage, make_ctx, tmp_path):
    """Fault: the SFT stage is SIGKILLed mid-training (after its step-4 checkpoint of
    8 steps). Guarantee: the killed run left no stage output (nothing downstream can use half a
    model); the re-run of the same stage resumes from checkpoint-4 (it trains only steps 5-8),
    reports the same step count as an uninterrupted run, ends with the same weights and loss,
    and removes its checkpoints once its output is whole."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(REPO / "tests"))
    from stage_resume_worker import run

    from tasks.durable import checkpoint_dir, last_complete_checkpoint
    from tasks.side_thread import intra_op_threads

    ctx = make_ctx(f"kill_{stage}")
    with intra_op_threads(1):  # the worker's arithmetic
        ref = run(stage, tmp_path, ctx, str(tmp_path / "uninterrupted"))

    out = str(tmp_path / "killed")
    kill_after_checkpoint([stage, str(tmp_path), ctx.model_dump_json(), out], step=4)
    assert not Path(out).exists()
    assert last_complete_checkpoint(checkpoint_dir(out)).endswith("checkpoint-4")

    subprocess.run(WORKER + [stage, str(tmp_path), ctx.model_dump_json(), out], check=True,
                   env=ENV, cwd=REPO, capture_output=True, timeout=300)
    resumed = json.loads(Path(out + ".result.json").read_text())
    assert resumed["metrics"][f"{stage}/steps"] == ref.metrics[f"{stage}/steps"] == 8

    client = MlflowClient(ctx.tracking_uri)
    run_info = client.get_run(resumed["run_id"])
    assert run_info.data.tags["rlhf.resumed_from"].endswith("checkpoint-4")
    losses = client.get_metric_history(resumed["run_id"], f"{stage}/loss")
    ref_losses = client.get_metric_history(ref.run_id, f"{stage}/loss")
    assert [m.step for m in losses] == [5, 6, 7, 8]  # steps 1-4 were not trained again
    assert [m.step for m in ref_losses] == list(range(1, 9))
    for a, b in zip(losses, ref_losses[4:]):
        assert a.value == pytest.approx(b.value, rel=1e-3, abs=1e-4)
    got, want = weights(out), weights(ref.model_uri)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)
    assert not Path(checkpoint_dir(out)).exists()
