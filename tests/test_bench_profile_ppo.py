"""bench/profile_ppo.py: its per-phase clocks see every step of the update they claim to time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_profile_accounts_for_each_minibatch_step(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "bench/profile_ppo.py", "--updates", "1", "--threads",
                           "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["per_update"]) == 1
    med = report["median"]
    # the phases lie inside the update's wall time, the minibatch steps inside the PPO update
    assert med["generation_s"] + med["scoring_s"] + med["update_s"] <= med["seconds"]
    steps = ("select", "response_logprobs", "response_values", "policy_loss", "value_loss",
             "backward", "clip_grad_norm", "optimizer step")
    # every wrapped call ran (a trainer that stopped calling one would leave a 0 here)
    assert all(med[f"update/{k}"] > 0 for k in steps)
    assert sum(med[f"update/{k}"] for k in steps) <= med["update_s"]
    assert report["op_kinds_ms"]["matrix multiplies"] > 0
    assert "| PPO update (16 minibatch steps) |" in report["table"]
