"""bench/feedback_rounds.py's arithmetic, on values checked by hand (the benchmark itself
trains dozens of reward models and is run by hand, not by the suite)."""

from __future__ import annotations

import pytest

from bench.feedback_rounds import labels_to_match, summarize


def test_labels_to_match_reads_the_random_curve_linearly():
    budgets, curve = [0, 32, 64, 128], [0.80, 0.82, 0.84, 0.85]
    assert labels_to_match(0.79, budgets, curve) == 0.0  # already there with none
    assert labels_to_match(0.82, budgets, curve) == pytest.approx(32.0)
    assert labels_to_match(0.83, budgets, curve) == pytest.approx(48.0)  # halfway 32 -> 64
    assert labels_to_match(0.8475, budgets, curve) == pytest.approx(112.0)  # 3/4 of 64 -> 128
    assert labels_to_match(0.86, budgets, curve) is None  # beyond what was measured


def test_summarize_means_paired_gain_and_labels_to_match():
    def run(acc_u, acc_r):
        return {"uncertainty": [{"acc_gold": a, "acc_labels": a} for a in acc_u],
                "random": [{"acc_gold": a, "acc_labels": a} for a in acc_r]}

    runs = [run([0.80, 0.84, 0.86], [0.80, 0.82, 0.84]),
            run([0.70, 0.76, 0.80], [0.70, 0.72, 0.76])]
    s = summarize(runs, [0, 32, 64])
    u, r = s["uncertainty"], s["random"]
    assert [x["acc_gold"] for x in u] == pytest.approx([0.75, 0.80, 0.83])
    assert [x["acc_gold"] for x in r] == pytest.approx([0.75, 0.77, 0.80])
    assert u[1]["acc_gold_sd"] == pytest.approx(0.0565685, abs=1e-6)  # sd of 0.84, 0.76
    assert u[2]["acc_gold_per_seed"] == [0.86, 0.80]
    # Same-seed differences: +0.02 and +0.04 at 32 labels, +0.02 and +0.04 at 64.
    assert s["paired_gain_gold"]["32"] == pytest.approx((0.03, 0.0141421), abs=1e-6)
    # Random reaches uncertainty@32 (0.80) at 64 labels; uncertainty@64 (0.83) never.
    assert s["random_labels_to_match_uncertainty"] == pytest.approx({"32": 64.0, "64": None})
