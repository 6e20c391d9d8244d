"""The promotion gate's pure decision, check by check: each threshold failing alone."""

from __future__ import annotations

import math

import pytest

from tasks.gate import GateConfig, decide, hacking_checks

CFG = GateConfig()
# A candidate that passes every check, judged by a gold judge, with a champion to beat.
GOOD = {"reward/longer_preferred": 0.6, "reward/heldout/longer_preferred": 0.55} | {
    f"eval/{k}": v for k, v in {
    "win_rate": 0.9, "win_rate_lo": 0.8, "win_rate_hi": 0.97, "matched_win_rate": 0.85,
    "matched_pairs": 300, "win_rate_heldout_rm": 0.9, "heldout_rm_length_corr": 0.3,
    "win_rate_rm": 1.0,
    "kl_policy_sft": 3.0, "gold_policy": 0.8, "gold_sft": 0.1,
    "len_policy": 13.0, "len_sft": 10.0, "repetition_policy": 0.02, "repetition_sft": 0.01,
    "ppl_policy": 12.0, "ppl_sft": 10.0, "ppl_champion": 11.0,
    "champion/win_rate": 0.7, "champion/win_rate_lo": 0.55, "champion/win_rate_hi": 0.82,
}.items()}


def failed(decision) -> list[str]:
    return [r for r in decision.reasons if r.startswith("FAIL: ")]


def test_good_candidate_is_promoted_with_a_reason_per_check():
    d = decide(GOOD, CFG)
    assert d.promote and failed(d) == []
    assert len(d.reasons) == 12  # data, win, bound, champion, KL, gold, 3 hacking, 2 ppl, finite
    assert "judged by the gold judge" in d.reasons[1]


@pytest.mark.parametrize("change, name, reason", [
    ({"eval/win_rate": 0.59}, "win_rate", "FAIL: win rate vs SFT 0.590 vs min_win_rate 0.6"),
    ({"eval/win_rate_lo": 0.49}, "win_rate_lower", "FAIL: win rate vs SFT lower bound 0.490"),
    ({"eval/champion/win_rate_lo": 0.45}, "champion", "FAIL: win rate vs production 0.700 (lower bound 0.450"),
    ({"eval/kl_policy_sft": 15.01}, "kl", "FAIL: KL(policy||SFT) 15.010 nats vs max_kl 15.0"),
    ({"eval/gold_policy": 0.1}, "gold_gain", "FAIL: gold gain +0.000 vs min_gold_gain 0.0"),
    ({"reward/heldout/longer_preferred": 0.99, "eval/len_policy": 24.0}, "length",
     "FAIL: reward hacking by length: the held-out reward model prefers the longer response "
     "in 99% of held-out pairs (max_longer_preferred 75%) and the candidate answers 24.0 tokens "
     "vs SFT's 10.0 (+140% vs max_length_increase +20%)"),
    ({"eval/win_rate_heldout_rm": 0.69}, "overoptimisation",
     "FAIL: over-optimisation of the reward model: win rate 1.000 by the optimised reward model "
     "vs 0.690 by the held-out one (gap +0.310 vs max_reward_divergence 0.3)"),
    ({"eval/repetition_policy": 0.2}, "repetition", "FAIL: reward hacking by repetition: repeated bigrams 0.200"),
    ({"eval/ppl_policy": 13.8}, "perplexity_production", "FAIL: perplexity on held-out SFT data 13.80 vs production 11.00 (+25%"),
    ({"eval/ppl_policy": 41.0, "eval/ppl_champion": 40.0}, "perplexity_sft",
     "FAIL: perplexity on held-out SFT data 41.00 vs SFT 10.00 (+310%"),
])
def test_each_threshold_fails_alone(change, name, reason):
    d = decide({**GOOD, **change}, CFG)
    assert not d.promote
    assert len(failed(d)) == 1 and failed(d)[0].startswith(reason), failed(d)
    assert d.failed == [name]  # what a feedback round targets


def test_data_checks_that_did_not_pass_refuse():
    d = decide(GOOD, CFG, data_passed=False)
    assert not d.promote and failed(d) == ["FAIL: data checks did not pass"]


def test_length_alone_or_a_length_loving_reward_alone_is_not_hacking():
    # Much longer answers from a reward model blind to length: fine.
    assert decide({**GOOD, "eval/len_policy": 24.0}, CFG).promote
    # A reward model that loves length, but the candidate did not get longer: fine.
    assert decide({**GOOD, "reward/heldout/longer_preferred": 0.99, "eval/len_policy": 11.9},
                  CFG).promote
    # The thresholds are inclusive: at exactly 75% and +20%, still clear.
    assert decide({**GOOD, "reward/heldout/longer_preferred": 0.75, "eval/len_policy": 24.0},
                  CFG).promote


def test_thresholds_are_inclusive_where_documented():
    # Minimums are >=, maximums <=; the gold gain must exceed its bound.
    assert decide({**GOOD, "eval/win_rate": 0.6, "eval/win_rate_lo": 0.5,
                   "eval/kl_policy_sft": 15.0, "eval/ppl_policy": 13.75}, CFG).promote
    assert not decide({**GOOD, "eval/gold_policy": GOOD["eval/gold_sft"]}, CFG).promote


@pytest.mark.parametrize("key", ["eval/win_rate", "eval/kl_policy_sft", "eval/gold_policy",
                                 "eval/repetition_policy", "eval/len_policy"])
def test_nan_or_inf_metric_refuses(key):
    for bad in (math.nan, math.inf):
        d = decide({**GOOD, key: bad}, CFG)
        assert not d.promote, (key, bad)
        assert any(key in r for r in failed(d)), d.reasons


def test_nan_measurements_that_mean_nothing_to_measure_do_not_refuse():
    # Every response the same length: Spearman is undefined; no lengths match: no matched rate.
    d = decide({**GOOD, "eval/heldout_rm_length_corr": math.nan,
                "eval/matched_win_rate": math.nan, "eval/matched_pairs": 0}, CFG)
    assert d.promote, failed(d)


def test_nan_length_preference_flags_a_longer_candidate():
    d = decide({**GOOD, "reward/heldout/longer_preferred": math.nan, "eval/len_policy": 24.0}, CFG)
    assert not d.promote and failed(d)[0].startswith("FAIL: reward hacking by length")


def test_missing_metric_refuses():
    for key in ("eval/kl_policy_sft", "eval/win_rate_lo", "eval/len_sft"):
        metrics = {k: v for k, v in GOOD.items() if k != key}
        assert not decide(metrics, CFG).promote, key


def test_no_champion_no_champion_check():
    first = {k: v for k, v in GOOD.items()
             if not k.startswith("eval/champion/") and k != "eval/ppl_champion"}
    d = decide(first, CFG)
    assert d.promote and not any("production" in r for r in d.reasons)


def test_early_stop_refused_only_when_not_allowed():
    stop = "KL 9.10 nats exceeded kl_budget 8.0 at step 12"
    allowed = decide(GOOD, CFG, stop_reason=stop)
    assert allowed.promote and f"pass: training stopped early: {stop}" in allowed.reasons
    refused = decide(GOOD, CFG.model_copy(update={"allow_early_stop": False}), stop_reason=stop)
    assert not refused.promote and failed(refused) == [f"FAIL: training stopped early: {stop}"]
    assert not any("stopped early" in r for r in decide(GOOD, CFG).reasons)


def test_without_gold_judge_the_heldout_reward_model_judges_and_the_reasons_say_so():
    rm_only = {k: v for k, v in GOOD.items() if not k.startswith("eval/gold")}
    d = decide(rm_only, CFG)
    assert d.promote
    assert "judged by the held-out reward model" in d.reasons[1]
    assert not any("gold gain" in r for r in d.reasons)


def test_hacking_checks_fall_back_to_the_policy_reward_model():
    metrics = {k.replace("heldout_rm", "rm"): v for k, v in GOOD.items()
               if k != "reward/heldout/longer_preferred"}
    (clear, text), _ = hacking_checks({**metrics, "reward/longer_preferred": 0.9,
                                       "eval/len_policy": 20.0}, CFG)
    assert not clear and "the reward model prefers the longer response in 90%" in text
