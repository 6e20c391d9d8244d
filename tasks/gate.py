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
from tasks.reward import RewardResult


class GateConfig(StageConfig):
    """Thresholds a candidate must meet to be promoted. Win rates are against SFT (and the
    production champion) by the most trusted judge: the gold judge when configured, else the
    held-out reward model; the reward-hacking checks need no gold judge."""

    min_win_rate: float = 0.6
    """Least share of held-out prompts where the candidate beats SFT (point estimate)."""
    min_win_rate_lower: float = 0.5
    """Least lower bound of that win rate's confidence interval: better than SFT, not by luck."""
    min_champion_win_rate_lower: float = 0.5
    """Least lower bound of the win rate against the current production version, when there
    is one: a candidate replaces production only if it is better, not by luck."""
    max_kl: float = 15.0
    """Largest mean KL(policy || SFT) per sequence, in nats: drift beyond it is refused."""
    min_gold_gain: float = 0.0
    """Mean gold score of the candidate minus SFT's must exceed this (when a judge is set)."""
    max_longer_preferred: float = 0.75
    """Reward hacking by length (Singhal et al. 2023): the share of held-out pairs where the
    judging reward model prefers the longer response, above which the reward is said to
    follow length (0.5 = blind to length; the demo's 0.57, its length-biased variant's 1.0);
    with ``max_length_increase`` it flags the candidate."""
    max_length_increase: float = 0.2
    """Reward hacking by length: largest relative rise of the mean response length over SFT's
    allowed when the reward follows length (0.2 = 1.2x)."""
    max_reward_divergence: float = 0.3
    """Over-optimisation (Gao et al. 2023): largest gap between the win rate by the reward
    model the policy optimised and by the held-out one; the optimised reward rising while a
    held-out signal does not means the policy learned that model's quirks."""
    max_repetition_increase: float = 0.1
    """Reward hacking by repetition: largest rise in the share of repeated word bigrams."""
    max_perplexity_increase: float = 0.25
    """Capability regression against production: largest relative rise of perplexity on
    held-out SFT demonstrations over the production version's (0.25 = at most 1.25x)."""
    max_perplexity_increase_vs_sft: float = 3.0
    """Capability regression against SFT, a looser bound: alignment moves a policy away from
    SFT on purpose (the demo's aligned policy: 2.8x SFT's perplexity on demonstrations of every
    tone), so this only catches collapse (3.0 = at most 4x)."""
    allow_early_stop: bool = True
    """Whether a policy whose training stopped early (e.g. KL budget) may be promoted."""
    require_approval: bool = False
    """After every check passes, pause the flow run until a person approves or rejects the
    promotion in the Prefect UI (Resume, with a form) or with ``resume_flow_run``."""
    approval_timeout_s: int = 86400
    """How long a promotion waits for approval; the flow run fails after that (nothing is
    promoted)."""


class Decision(BaseModel):
    """The gate's verdict: every check's outcome in ``reasons`` (``pass: ...`` / ``FAIL: ...``)."""

    promote: bool
    reasons: list[str]
    failed: list[str] = []
    """The failed checks' names (``CHECKS``): what a feedback round's labels should target."""
    run_id: str | None = None
    """The gate's MLflow child run, once the decision is recorded."""


CHECKS = ("data", "win_rate", "win_rate_lower", "champion", "kl", "gold_gain", "length",
          "repetition", "overoptimisation", "perplexity_sft", "perplexity_production",
          "finite", "early_stop", "approval")
"""Every check's name, as ``Decision.failed`` lists them."""

MAY_BE_NAN = ("_length_corr", "longer_preferred", "matched_win_rate")


def decide(metrics: dict[str, float], cfg: GateConfig, stop_reason: str | None = None,
           data_passed: bool = True) -> Decision:
    """Promote only when every check holds; every check contributes a reason either way.

    A missing or NaN metric fails its check (NaN compares false both ways, so each check is
    written as "value is good", never as "value is not bad").
    """
    reasons, failed = [], []

    def check(name: str, passed: bool, text: str) -> None:
        if not passed:
            failed.append(name)
        reasons.append(("pass: " if passed else "FAIL: ") + text)

    m = lambda key: metrics.get(f"eval/{key}", float("nan"))  # noqa: E731
    gold = "eval/gold_policy" in metrics
    judge = "gold judge" if gold else (
        "held-out reward model" if "eval/win_rate_heldout_rm" in metrics else "reward model")
    check("data", data_passed,
          "data checks passed" if data_passed else "data checks did not pass")
    check("win_rate", m("win_rate") >= cfg.min_win_rate,
          f"win rate vs SFT {m('win_rate'):.3f} vs min_win_rate {cfg.min_win_rate} "
          f"(judged by the {judge})")
    check("win_rate_lower", m("win_rate_lo") >= cfg.min_win_rate_lower,
          f"win rate vs SFT lower bound {m('win_rate_lo'):.3f} vs min_win_rate_lower "
          f"{cfg.min_win_rate_lower}")
    if "eval/champion/win_rate" in metrics:
        check("champion", m("champion/win_rate_lo") >= cfg.min_champion_win_rate_lower,
              f"win rate vs production {m('champion/win_rate'):.3f} (lower bound "
              f"{m('champion/win_rate_lo'):.3f} vs min_champion_win_rate_lower "
              f"{cfg.min_champion_win_rate_lower})")
    check("kl", m("kl_policy_sft") <= cfg.max_kl,
          f"KL(policy||SFT) {m('kl_policy_sft'):.3f} nats vs max_kl {cfg.max_kl}")
    if gold:
        gain = m("gold_policy") - m("gold_sft")
        check("gold_gain", gain > cfg.min_gold_gain,
              f"gold gain {gain:+.3f} vs min_gold_gain {cfg.min_gold_gain}")
    for (clear, text), name in zip(hacking_checks(metrics, cfg), HACKING_CHECKS):
        check(name, clear, text)
    for base, field in (("sft", "max_perplexity_increase_vs_sft"),
                        ("champion", "max_perplexity_increase")):
        limit = getattr(cfg, field)
        if "eval/ppl_policy" in metrics and f"eval/ppl_{base}" in metrics:
            rise = m("ppl_policy") / m(f"ppl_{base}") - 1
            name = "perplexity_sft" if base == "sft" else "perplexity_production"
            check(name, rise <= limit, f"perplexity on held-out SFT data {m('ppl_policy'):.2f} vs "
                  f"{'SFT' if base == 'sft' else 'production'} {m(f'ppl_{base}'):.2f} "
                  f"({rise:+.0%} vs {field} {limit:+.0%})")
    # NaN is a measurement for these: a correlation when every response has the same length,
    # a length-matched win rate when no lengths match; any other non-finite metric means
    # something broke.
    bad = sorted(k for k, v in metrics.items()
                 if not math.isfinite(v) and not any(part in k for part in MAY_BE_NAN))
    check("finite", not bad,
          f"all evaluation metrics finite{': not ' + ', '.join(bad) if bad else ''}")
    if stop_reason:
        check("early_stop", cfg.allow_early_stop, f"training stopped early: {stop_reason}")
    return Decision(promote=not failed, reasons=reasons, failed=failed)


HACKING_CHECKS = ("length", "repetition", "overoptimisation")
"""``hacking_checks``' names, in its order (the last only with a held-out reward model)."""


def hacking_checks(metrics: dict[str, float], cfg: GateConfig) -> list[tuple[bool, str]]:
    """Reward-hacking checks that need no gold judge: (clear, what was measured) each.

    Length: a reward model trained on length-biased labels is biased the same way (a held-out
    one too), so look at what it rewards. The candidate is flagged when the judging reward
    model prefers the longer response of most held-out pairs (``max_longer_preferred``) *and*
    the candidate answers longer than SFT (``max_length_increase``): the reward it won is then
    explained by length. Repetition: the candidate repeats itself more than SFT by
    ``max_repetition_increase``. Over-optimisation: the reward the policy optimised says it
    wins while a held-out reward model does not (``max_reward_divergence``). ``metrics`` holds
    the reward stage's and the evaluation's.
    """
    m = lambda key: metrics.get(f"eval/{key}", float("nan"))  # noqa: E731
    heldout = "eval/win_rate_heldout_rm" in metrics
    prefers = metrics.get("reward/heldout/longer_preferred" if heldout
                          else "reward/longer_preferred", float("nan"))
    rise = m("len_policy") / m("len_sft") - 1
    # Written as "clear when good", so a NaN measurement flags rather than passes (lengths are
    # always measured; a reward model's preference is NaN only if no held-out pair differs).
    length_clear = math.isfinite(rise) and (prefers <= cfg.max_longer_preferred
                                            or rise <= cfg.max_length_increase)
    length = (f"{'no ' if length_clear else ''}reward hacking by length: the "
              f"{'held-out ' if heldout else ''}reward model prefers the longer response in "
              f"{prefers:.0%} of held-out pairs (max_longer_preferred "
              f"{cfg.max_longer_preferred:.0%}) and the candidate answers {m('len_policy'):.1f} "
              f"tokens vs SFT's {m('len_sft'):.1f} ({rise:+.0%} vs max_length_increase "
              f"{cfg.max_length_increase:+.0%}); "
              + (f"at equal length it wins {m('matched_win_rate'):.3f} of "
                 f"{m('matched_pairs'):.0f} sample pairs" if m("matched_pairs") > 0
                 else "no sample pair of equal length to compare"))
    more = m("repetition_policy") - m("repetition_sft")
    repetition_clear = more <= cfg.max_repetition_increase
    repetition = (f"{'no ' if repetition_clear else ''}reward hacking by repetition: repeated "
                  f"bigrams {m('repetition_policy'):.3f} vs SFT's {m('repetition_sft'):.3f} "
                  f"(rise {more:+.3f} vs max_repetition_increase {cfg.max_repetition_increase})")
    checks = [(length_clear, length), (repetition_clear, repetition)]
    if heldout:
        gap = m("win_rate_rm") - m("win_rate_heldout_rm")
        clear = gap <= cfg.max_reward_divergence
        checks.append((clear, f"{'no ' if clear else ''}over-optimisation of the reward model: "
                       f"win rate {m('win_rate_rm'):.3f} by the optimised reward model vs "
                       f"{m('win_rate_heldout_rm'):.3f} by the held-out one (gap {gap:+.3f} vs "
                       f"max_reward_divergence {cfg.max_reward_divergence})"))
    return checks


class Approval(BaseModel):
    """What a reviewer answers when the gate asks (the Prefect UI renders it as a form)."""

    approve: bool
    """Promote this candidate."""
    reviewer: str = ""
    comment: str = ""


def with_approval(decision: Decision, approval: Approval) -> Decision:
    """The decision once a person has answered: one more check, with who and why."""
    who = approval.reviewer or "a reviewer"
    why = f": {approval.comment}" if approval.comment else ""
    reason = f"{'pass' if approval.approve else 'FAIL'}: human approval by {who}{why}"
    return Decision(promote=decision.promote and approval.approve,
                    reasons=[*decision.reasons, reason], run_id=decision.run_id,
                    failed=decision.failed + ([] if approval.approve else ["approval"]))


def ask_approval(decision: Decision, cfg: GateConfig, ctx: TrackingContext | None) -> Decision:
    """Pause the flow run until a person answers (only from inside a flow, not a task); the
    answer is recorded on the gate's MLflow run."""
    from prefect import get_run_logger, pause_flow_run

    get_run_logger().info("gate: waiting up to %ss for human approval; checks:\n%s",
                          cfg.approval_timeout_s, "\n".join(decision.reasons))
    approval = pause_flow_run(wait_for_input=Approval, timeout=cfg.approval_timeout_s,
                              poll_interval=5)
    decision = with_approval(decision, approval)
    if ctx is not None and decision.run_id:
        from mlflow import MlflowClient

        client = MlflowClient(ctx.tracking_uri)
        client.set_tag(decision.run_id, "gate.approval", decision.reasons[-1][:5000])
        client.log_metric(decision.run_id, "gate/promoted", int(decision.promote))
    return decision


def run_gate(cfg: GateConfig, *, evaluation: EvaluateResult, reward: RewardResult,
             policy: PolicyResult, data_passed: bool, seed: int,
             ctx: TrackingContext) -> Decision:
    """Decide and record the decision in the gate's child run; no registry write here."""
    import mlflow

    from tasks.tracking import stage_run

    decision = decide({**reward.metrics, **evaluation.metrics}, cfg, policy.stop_reason,
                      data_passed)
    with stage_run(ctx, "gate", cfg, seed) as run:
        mlflow.log_metric("gate/promoted", int(decision.promote))
        mlflow.set_tag("gate.decision", "promote" if decision.promote else "refuse")
        mlflow.set_tag("gate.reasons", "; ".join(decision.reasons)[:5000])
        mlflow.log_dict(decision.model_dump(), "gate_decision.json")
    return decision.model_copy(update={"run_id": run.info.run_id})


gate_task = task(name="gate")(run_gate)
