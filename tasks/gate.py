"""Promotion gate: a pure decision from the evaluation, and a separate registry write.

``decide`` only reads metrics and thresholds, so it is tested on its own and can never leave
the registry half-written. ``register_policy`` is the side effect: it registers the policy
(and the reward model it was trained against) and moves the configured aliases. Registry
stages are deprecated in MLflow 3, so "stages" are aliases (``staging``, ``production``).
"""

from __future__ import annotations

import json
import math

from prefect import task
from pydantic import BaseModel

from tasks.base import ModelResult, PolicyResult, StageConfig, TrackingContext
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


class RegistryConfig(StageConfig):
    """Registered model names and the aliases a promotion moves."""

    policy_name: str = "rlhf-policy"
    """Registered model name for promoted policies."""
    reward_name: str = "rlhf-reward-model"
    """Registered model name for the reward models promoted policies were trained against."""
    aliases: list[str] = ["staging"]
    """Aliases set on a promoted version; add ``production`` to deploy straight away."""


class Decision(BaseModel):
    """The gate's verdict: every check's outcome in ``reasons`` (``pass: ...`` / ``FAIL: ...``)."""

    promote: bool
    reasons: list[str]
    run_id: str | None = None
    """The gate's MLflow child run, once the decision is recorded."""


class Registration(BaseModel):
    """The registry versions a promotion created and the aliases it moved to them."""

    policy_name: str
    policy_version: str
    reward_name: str
    reward_version: str
    aliases: list[str]


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


def register_policy(cfg: RegistryConfig, *, policy: ModelResult, reward: ModelResult,
                    sft: ModelResult, data_hashes: dict[str, str], metrics: dict[str, float],
                    ctx: TrackingContext) -> Registration:
    """Register reward model and policy versions with lineage tags, then move the aliases.

    Aliases move last: if anything before fails, the versions created so far are deleted so
    the registry never shows a half-registered promotion.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(ctx.tracking_uri)
    created: list[tuple[str, str]] = []

    def new_version(name: str, run_id: str, tags: dict[str, str]) -> str:
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # already exists
        source = client.get_run(run_id).info.artifact_uri + "/model"
        mv = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        created.append((name, mv.version))
        return str(mv.version)  # an int from the SQL store, a str over REST

    lineage = {"rlhf.parent_run_id": ctx.parent_run_id, "rlhf.sft_run_id": sft.run_id,
               **{f"data.{k}.sha256": v for k, v in data_hashes.items()}}
    try:
        rm_version = new_version(cfg.reward_name, reward.run_id,
                                 {**lineage, "rlhf.role": "reward_model"})
        policy_version = new_version(cfg.policy_name, policy.run_id, {
            **lineage, "rlhf.role": "policy", "rlhf.reward_model": f"{cfg.reward_name}/{rm_version}",
            "rlhf.reward_run_id": reward.run_id, "rlhf.eval": json.dumps(metrics)[:5000]})
        for alias in cfg.aliases:
            client.set_registered_model_alias(cfg.policy_name, alias, policy_version)
            client.set_registered_model_alias(cfg.reward_name, alias, rm_version)
    except Exception:
        for name, version in created:
            client.delete_model_version(name, version)
        raise
    client.set_tag(ctx.parent_run_id, "registry.policy_version", policy_version)
    return Registration(policy_name=cfg.policy_name, policy_version=policy_version,
                        reward_name=cfg.reward_name, reward_version=rm_version,
                        aliases=cfg.aliases)


gate_task = task(name="gate")(run_gate)
register_task = task(name="register")(register_policy)
