"""The run report: built from typed stage results, rendered to markdown and HTML."""

from __future__ import annotations

from tasks.base import PolicyResult
from tasks.evaluate import EvaluateResult
from tasks.gate import Decision
from tasks.report import build_report, to_html, to_markdown

EVAL = EvaluateResult(stage="evaluate", run_id="e1", judge="heldout_rm", champion_version="3",
                      metrics={f"eval/{k}": v for k, v in {
                          "num_prompts": 64, "win_rate_heldout_rm": 0.984, "win_rate_heldout_rm_lo": 0.95,
                          "win_rate_heldout_rm_hi": 1.0, "matched_win_rate_heldout_rm": 0.61,
                          "matched_pairs_heldout_rm": 40,
                          "champion/win_rate": 0.55, "champion/win_rate_lo": 0.42,
                          "champion/win_rate_hi": 0.68, "champion/matched_win_rate": 0.5,
                          "champion/matched_pairs": 300,
                          "len_policy": 16.04, "len_sft": 10.6, "repetition_policy": 0.02,
                          "repetition_sft": 0.01, "heldout_rm_length_corr": 0.83,
                          "kl_policy_sft": 3.1}.items()})
POLICY = PolicyResult(stage="policy", run_id="p1", model_uri="/x", algorithm="ppo", steps=12,
                      planned_steps=48, stop_reason="KL 9.1 exceeded kl_budget 8 at step 12")
DECISION = Decision(promote=False, reasons=["pass: data checks passed",
                                            "FAIL: reward hacking by length: <score> follows"])


def test_report_sections_carry_the_numbers():
    sections = build_report("demo", "feedback_round_needed", DECISION, EVAL, POLICY,
                            {"reward": {"reward/eval_accuracy": 0.8125,
                                        "reward/heldout/longer_preferred": 0.998}}, "Next: label.")
    md = to_markdown(sections)
    assert "**feedback_round_needed**" in md and "Next: label." in md
    assert "| heldout_rm | SFT | 0.984 | [0.950, 1.000] | 0.610 (40) |" in md
    assert "| heldout_rm | production v3 | 0.550 | [0.420, 0.680] | 0.500 (300) |" in md
    assert "| response tokens | 16.0 | 10.6 |" in md
    assert "| held-out SFT perplexity | n/a | n/a |" in md  # not measured: said, not invented
    assert "- heldout_rm score vs length, Spearman: 0.83" in md
    assert "12 of 48 steps, stopped early: KL 9.1" in md
    assert "| reward | reward/eval_accuracy | 0.8125 |" in md
    assert "- the held-out reward model prefers the longer response of a held-out pair: 100%" in md
    assert "- FAIL: reward hacking by length" in md


def test_html_escapes_and_keeps_the_image():
    page = to_html(build_report("demo", "promoted", DECISION, EVAL, POLICY, {}, "ok"))
    assert "&lt;score&gt;" in page and "<score>" not in page
    assert '<img alt="training curves" src="training_curves.png"' in page
    assert "<td>0.984</td>" in page
