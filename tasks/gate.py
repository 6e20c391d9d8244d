"""Promotion gate: a pure decision from the evaluation; the registry write is elsewhere.

``decide`` only reads metrics and thresholds, so it is tested on its own and can never leave
the registry half-written. The side effects (registering the candidate, moving the
``staging``/``production`` aliases when the gate promotes) are ``tasks/register.py``.
"""

from __future__ import annotations

import math

from prefect import task
from pydantic import BaseModel

from tasks.base import PolicyResult, StageConfig, TrackingContext
from tasks.evaluate import EvaluateResult


class GateConfig(StageConfig):
    """Thresholds a policy must meet to be promoted."""

    min_win_rate: float = 0.6
    """Minimum share of held-out prompts where the policy beats SFT (gold judge if set)."""
    max_kl: float = 15.0
    """Maximum mean KL(policy || SFT) per sequence, in nats: drift beyond it is refused."""
    min_gold_gain: float = 0.0
    """Mean gold score of the policy minus SFT's must exceed this (when a judge is set)."""
    allow_early_stop: bool = True
    """Whether a policy whose training stopped early (e.g. KL budget) may be promoted."""


class Decision(BaseModel):
    """The gate's verdict: every check's outcome in ``reasons`` (``pass: ...`` / ``FAIL: ...``)."""

    promote: bool
    reasons: list[str]
    run_id: str | None = None
    """The gate's MLflow child run, once the decision is recorded."""


def decide(metrics: dict[str, float], cfg: GateConfig, stop_reason: str | None = None) -> Decision:
    """Promote only when every threshold holds; every check contributes a reason either way.

    A missing or NaN metric fails its check (NaN compares false both ways, so each check is
    written as "value is good", never as "value is not bad").
    """
    reasons, ok = [], True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        reasons.append(("pass: " if passed else "FAIL: ") + text)

    nan = float("nan")
    judged_by_gold = "eval/gold_policy" in metrics
    judge = "gold judge" if judged_by_gold else (
        "reward model: no gold judge configured, so a policy that games the reward model "
        "would pass this check")
    win = metrics.get("eval/win_rate", nan)
    check(win >= cfg.min_win_rate,
          f"win rate {win:.3f} vs min_win_rate {cfg.min_win_rate} (judged by the {judge})")
    kl = metrics.get("eval/kl_policy_sft", nan)
    check(kl <= cfg.max_kl, f"KL(policy||SFT) {kl:.3f} nats vs max_kl {cfg.max_kl}")
    if judged_by_gold:
        gain = metrics["eval/gold_policy"] - metrics.get("eval/gold_sft", nan)
        check(gain > cfg.min_gold_gain, f"gold gain {gain:+.3f} vs min_gold_gain {cfg.min_gold_gain}")
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    check(not bad, f"all evaluation metrics finite{': not ' + ', '.join(bad) if bad else ''}")
    if stop_reason:
        check(cfg.allow_early_stop, f"training stopped early: {stop_reason}")
    return Decision(promote=ok, reasons=reasons)


def run_gate(cfg: GateConfig, *, evaluation: EvaluateResult, policy: PolicyResult, seed: int,
             ctx: TrackingContext) -> Decision:
    """Decide and record the decision in the gate's child run; no registry write here."""
    import mlflow

    from tasks.tracking import stage_run

    decision = decide(evaluation.metrics, cfg, policy.stop_reason)
    with stage_run(ctx, "gate", cfg, seed) as run:
        mlflow.log_metric("gate/promoted", int(decision.promote))
        mlflow.set_tag("gate.decision", "promote" if decision.promote else "refuse")
        mlflow.set_tag("gate.reasons", "; ".join(decision.reasons)[:5000])
        mlflow.log_dict(decision.model_dump(), "gate_decision.json")
    return decision.model_copy(update={"run_id": run.info.run_id})


gate_task = task(name="gate")(run_gate)
