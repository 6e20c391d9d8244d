"""SIGKILL the PPO loop mid-way, re-run, and finish from the checkpoint."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch


WORKER = [sys.executable, "tests/ppo_resume_worker.py"]


@pytest.fixture(scope="module")
def rm_dir(tiny_reward_dir):
    return tiny_reward_dir


def test_sigkill_then_rerun_finishes_with_same_steps(rm_dir, tmp_path):
    # Uninterrupted run: the reference step count and per-step history.
    full = tmp_path / "full.json"
    subprocess.run(WORKER + [rm_dir, str(tmp_path / "full.pt"), str(full)], check=True,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True)
    expected = json.loads(full.read_text())
    assert expected["steps"] == expected["planned_steps"] == 6

    ckpt, out = tmp_path / "killed.pt", tmp_path / "killed.json"
    proc = subprocess.Popen(WORKER + [rm_dir, str(ckpt), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.strip() == "step 3":
            break
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, as with an OOM kill
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.exists() and not out.exists()
    done_before = torch.load(ckpt, weights_only=False)["step"]
    assert 2 <= done_before < 6

    rerun = subprocess.run(WORKER + [rm_dir, str(ckpt), str(out)], check=True,
                           capture_output=True, text=True)
    resumed = json.loads(out.read_text())
    # Only the missing updates ran, and the stage reports every planned step.
    assert [l for l in rerun.stdout.split("\n") if l] == [f"step {s}"
                                                        for s in range(done_before + 1, 7)]
    assert resumed["steps"] == expected["steps"] and resumed["stop_reason"] is None
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))
    # RNG, optimizer, sampler and KL controller all restored: the same trajectory.
    for a, b in zip(resumed["history"], expected["history"]):
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-4)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
