"""The RLHF pipeline flow: it only composes stages.

validate -> SFT -> reward model -> policy optimisation -> evaluate -> register the candidate
-> gate -> promote (alias ``staging``, and ``production`` if configured), or "feedback round
needed". One MLflow parent run per pipeline run (``tasks.tracking.pipeline_run``); each stage
opens its own child run from the ``TrackingContext`` handed to it (MLflow's active run is per
thread). Stages hand each other small typed results (URIs, run ids, hashes), never models.

Stages are content-addressed (``tasks.cache``): each runs in ``{output_dir}/{name}/{stage}-{key}``,
the key hashing its config, seed, input contents and code version. A stage whose folder holds
a finished result is reused, not run (said in the log and on its MLflow child run); an
interrupted one runs again in the same folder (PPO resumes from its checkpoint); a change
re-runs exactly the stages downstream of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.config import PipelineConfig
from tasks.cache import Stages
from tasks.evaluate import evaluate_task
from tasks.gate import Decision, ask_approval, gate_task
from tasks.policy import policy_task
from tasks.refusal import accepted, refusals_as_failed
from tasks.register import Registration, champion_task, promote_task, register_task
from tasks.report import report_task
from tasks.reward import reward_task
from tasks.sft import sft_task
from tasks.tracking import pipeline_run
from tasks.validation import validation_task


class PipelineResult(BaseModel):
    """What one pipeline run decided, and where to find it."""

    result: Literal["promoted", "feedback_round_needed"]
    parent_run_id: str
    tracking_uri: str
    decision: Decision
    metrics: dict[str, float]
    policy_uri: str
    sft_model_uri: str
    reward_model_uri: str
    heldout_reward_uri: str | None = None
    """The reward models the policy was trained and judged with (a feedback round reuses
    them to choose what to label)."""
    champion_uri: str | None = None
    """The production policy the candidate was measured against (downloaded), if any."""
    registration: Registration | None = None
    """The promoted version and its aliases; None when the gate refused."""
    candidate: Registration | None = None
    """The evaluated policy's registry version (alias ``candidate``), promoted or not."""
    reused: dict[str, str] = {}
    """Stage -> the earlier MLflow run it was reused from (its key was unchanged)."""


def next_step(registration: Registration | None) -> str:
    if registration is None:
        return ("Not promoted: a human-feedback round is needed; the failed checks above say "
                "what the next labels should target.")
    return (f"Registered as {registration.policy_name} version {registration.policy_version} "
            f"with aliases {', '.join(registration.aliases)}.")


# No log_prints: it would turn the bytecode listings that `datasets` prints into its own
# fingerprint buffer into thousands of Prefect log lines.
@flow(name="rlhf-pipeline")
@refusals_as_failed  # refused data: a Failed run with one line, not a traceback (tasks/refusal.py)
def rlhf_pipeline(config: PipelineConfig,
                  tags: dict[str, str] | None = None) -> PipelineResult:
    """Run every stage once; returns the gate's decision and where everything went.
    ``tags`` go on the parent run (e.g. the feedback round that started it)."""
    c, seed, root = config, config.seed, Path(config.output_dir) / config.name
    with pipeline_run(c.name, c.tracking.experiment, c.tracking.uri, c, tags=tags,
                      artifacts=c.tracking.artifact_location) as run:
        ctx = run.ctx
        # Each stage runs in its own content-addressed folder, or is reused (tasks.cache).
        stages = Stages(root, ctx)
        # With quarantine on, `checked.data` points at clean copies: train on those, never the
        # originals (which stay byte-identical).
        checked = accepted(stages.run(validation_task, c.validation, data=c.data.model_dump(),
                                      tokenizer_path=c.base_model.path,
                                      chat_template=c.base_model.chat_template))
        run.tag_data(checked.hashes)
        data = checked.data
        sft = stages.run(sft_task, c.sft, launch=c.launch, base_model=c.base_model,
                         data_uri=data["sft"], seed=seed)
        reward = stages.run(reward_task, c.reward, launch=c.launch, sft_model_uri=sft.model_uri,
                            train_uri=data["preferences"], eval_uri=data["eval_pairs"],
                            rl_prompts_uri=data["rl_prompts"], seed=seed)
        policy = stages.run(policy_task, c.policy, launch=c.launch, sft_model_uri=sft.model_uri,
                            reward_model_uri=reward.model_uri, prompts_uri=data["rl_prompts"],
                            preferences_uri=data["preferences"], seed=seed)
        # The production version to beat, unless the candidate is that very version.
        champion = champion_task(c.registry, policy=policy, out_dir=str(root / "champion"),
                                 ctx=ctx)
        evaluation = stages.run(evaluate_task, c.evaluate, policy_uri=policy.model_uri,
                                sft_model_uri=sft.model_uri, reward_model_uri=reward.model_uri,
                                heldout_reward_uri=reward.heldout_model_uri,
                                heldout_sft_uri=sft.heldout_uri,
                                champion_uri=champion.policy_dir if champion else None,
                                champion_version=champion.version if champion else None,
                                eval_prompts_uri=data["eval_prompts"], seed=seed)
        candidate = register_task(c.registry, policy=policy, reward=reward, sft=sft,
                                  evaluation=evaluation, data_hashes=checked.hashes, ctx=ctx)
        decision = stages.run(gate_task, c.gate, evaluation=evaluation, reward=reward,
                              policy=policy, data_passed=checked.passed, seed=seed)
        if decision.promote and c.gate.require_approval:
            decision = ask_approval(decision, c.gate, ctx)
        registration = promote_task(c.registry, candidate=candidate,
                                    ctx=ctx) if decision.promote else None
        # The next issue turns a refusal into a human-feedback round.
        result = "promoted" if decision.promote else "feedback_round_needed"
        report_task(name=c.name, result=result, decision=decision, evaluation=evaluation,
                    policy=policy, next_step=next_step(registration), ctx=ctx,
                    stage_metrics={s.stage: s.metrics for s in (checked, sft, reward, policy)})
        run.record(result, {**evaluation.metrics, "gate/promoted": int(decision.promote)})
    log = get_run_logger()
    for reason in decision.reasons:
        log.info("gate %s", reason)
    log.info("result: %s", result)
    return PipelineResult(result=result, parent_run_id=ctx.parent_run_id,
                          tracking_uri=ctx.tracking_uri, decision=decision,
                          metrics=evaluation.metrics, policy_uri=policy.model_uri,
                          sft_model_uri=sft.model_uri, reward_model_uri=reward.model_uri,
                          heldout_reward_uri=reward.heldout_model_uri,
                          champion_uri=champion.policy_dir if champion else None,
                          registration=registration, candidate=candidate,
                          reused=stages.reused)
