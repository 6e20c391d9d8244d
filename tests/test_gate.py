"""The promotion gate's pure decision, check by check: each threshold failing alone."""

from __future__ import annotations

import math

import pytest

from tasks.gate import GateConfig, decide

CFG = GateConfig(min_win_rate=0.6, max_kl=15.0, min_gold_gain=0.0, allow_early_stop=True)
# A policy that passes every check, judged by a gold judge.
GOOD = {"eval/win_rate": 0.9, "eval/kl_policy_sft": 3.0, "eval/gold_policy": 0.8,
        "eval/gold_sft": 0.1, "eval/rm_policy": 1.2, "eval/rm_sft": 0.0}


def failed(decision) -> list[str]:
    return [r for r in decision.reasons if r.startswith("FAIL: ")]


def test_good_policy_is_promoted_with_a_reason_per_check():
    d = decide(GOOD, CFG)
    assert d.promote and failed(d) == []
    assert [r.split(":")[1].split()[0] for r in d.reasons] == ["win", "KL(policy||SFT)", "gold",
                                                                "all"]
    assert "judged by the gold judge" in d.reasons[0]


@pytest.mark.parametrize("change, reason", [
    ({"eval/win_rate": 0.59}, "FAIL: win rate 0.590 vs min_win_rate 0.6"),
    ({"eval/kl_policy_sft": 15.01}, "FAIL: KL(policy||SFT) 15.010 nats vs max_kl 15.0"),
    ({"eval/gold_policy": 0.1}, "FAIL: gold gain +0.000 vs min_gold_gain 0.0"),
])
def test_each_threshold_fails_alone(change, reason):
    d = decide({**GOOD, **change}, CFG)
    assert not d.promote
    assert len(failed(d)) == 1 and failed(d)[0].startswith(reason)


def test_thresholds_are_inclusive_where_documented():
    # min_win_rate is a minimum (>=), max_kl a maximum (<=); the gold gain must exceed its bound.
    assert decide({**GOOD, "eval/win_rate": 0.6, "eval/kl_policy_sft": 15.0}, CFG).promote
    assert not decide({**GOOD, "eval/gold_policy": GOOD["eval/gold_sft"]}, CFG).promote


@pytest.mark.parametrize("key", ["eval/win_rate", "eval/kl_policy_sft", "eval/gold_policy",
                                 "eval/rm_policy"])
def test_nan_or_inf_metric_refuses(key):
    for bad in (math.nan, math.inf):
        d = decide({**GOOD, key: bad}, CFG)
        assert not d.promote, (key, bad)
        assert any(key in r for r in failed(d)), d.reasons


def test_missing_metric_refuses():
    metrics = dict(GOOD)
    del metrics["eval/kl_policy_sft"]
    d = decide(metrics, CFG)
    assert not d.promote and failed(d)[0].startswith("FAIL: KL(policy||SFT) nan")


def test_early_stop_refused_only_when_not_allowed():
    stop = "KL 9.10 nats exceeded kl_budget 8.0 at step 12"
    allowed = decide(GOOD, CFG, stop_reason=stop)
    assert allowed.promote and f"pass: training stopped early: {stop}" in allowed.reasons
    refused = decide(GOOD, CFG.model_copy(update={"allow_early_stop": False}), stop_reason=stop)
    assert not refused.promote and failed(refused) == [f"FAIL: training stopped early: {stop}"]
    assert not any("stopped early" in r for r in decide(GOOD, CFG).reasons)


def test_without_gold_judge_the_reward_model_judges_and_the_reasons_say_so():
    rm_only = {k: v for k, v in GOOD.items() if not k.startswith("eval/gold")}
    d = decide(rm_only, CFG)
    assert d.promote
    assert "judged by the reward model: no gold judge configured" in d.reasons[0]
    assert not any("gold gain" in r for r in d.reasons)
