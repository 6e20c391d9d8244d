"""Human-feedback rounds: what the pipeline does when the gate refuses a policy.

One round (``feedback_round``): select the pairs the reward models are least sure of -> write
them as a labeling batch -> label (simulated annotators or the labeling page) -> check the
labels (validation stage: label suite, annotator agreement) -> a new content-addressed version
of the preference data (old pairs + new) -> the pipeline again on that version, evaluated and
gated again. ``feedback_rounds`` repeats rounds until a run is promoted or N rounds are spent.

Each round is one MLflow run in the pipeline's experiment (tags: ``rlhf.triggered_by`` = the
refused pipeline run, the batch, the dataset version, the agreement metrics, the outcome); the
pipeline run it starts carries ``rlhf.feedback_round`` = that round's run id. Files go to
``<output_dir>/<name>/feedback/round-<triggering run id>/`` (batch, labels, pairs, validation
report) and ``<output_dir>/<name>/data/`` (dataset versions).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.pipeline import PipelineResult, rlhf_pipeline
from tasks.feedback import CheckedLabels, Models, check_task, label_task, select_task
from tasks.labelers import make_labeler
from tasks.refusal import accepted, refusals_as_failed
from tasks.tracking import pipeline_run


class RoundResult(BaseModel):
    """One feedback round: where its files went and what the pipeline then decided."""

    round_run_id: str
    triggered_by: str
    batch_uri: str
    labels_uri: str
    checked: CheckedLabels
    pipeline: PipelineResult
    config: PipelineConfig
    """The config the round's pipeline ran with (data pointing at the new version)."""


def trained_models(result: PipelineResult) -> Models:
    """The policy a pipeline run trained, what it was measured against (each pair's baseline
    response: the production champion, else the SFT model it started from), the reward models
    it was trained and judged with, and the checks the gate failed."""
    return Models(policy_uri=result.policy_uri, reward_model_uri=result.reward_model_uri,
                  heldout_model_uri=result.heldout_reward_uri,
                  baseline_uri=result.champion_uri or result.sft_model_uri,
                  failed_checks=result.decision.failed)


@flow(name="rlhf-feedback-round")
@refusals_as_failed  # refused data or labels: a Failed run, no traceback (tasks/refusal.py)
def feedback_round(config: PipelineConfig, triggered_by: PipelineResult,
                   index: int = 1) -> RoundResult:
    """One round after the refused run ``triggered_by``; returns the new pipeline run's result."""
    from mlflow import MlflowClient

    c, f = config, config.feedback
    log = get_run_logger()
    root = Path(c.output_dir) / c.name
    round_dir = str(root / "feedback" / f"round-{triggered_by.parent_run_id}")
    tags = {"rlhf.stage": "feedback_round", "rlhf.triggered_by": triggered_by.parent_run_id,
            "rlhf.feedback_round_index": str(index)}
    with pipeline_run(c.name, c.tracking.experiment, c.tracking.uri, c,
                      run_name=f"{c.name}-feedback-round-{index}", tags=tags,
                      artifacts=c.tracking.artifact_location) as run:
        ctx, rid = run.ctx, run.ctx.parent_run_id
        client = MlflowClient(ctx.tracking_uri)
        seed = c.seed + index  # another sample of candidates each round
        batch_uri, select_metrics = select_task(f, models=trained_models(triggered_by),
                                                prompts_uri=c.data.rl_prompts, seed=seed,
                                                out_dir=round_dir)
        client.set_tag(rid, "rlhf.batch_uri", batch_uri)
        labeler = make_labeler(f, judge=c.evaluate.gold_judge, seed=seed)
        labels_uri = label_task(labeler, batch_uri)
        client.set_tag(rid, "rlhf.labels_uri", labels_uri)
        checked = accepted(check_task(batch_uri=batch_uri, labels_uri=labels_uri,
                                      preferences_uri=c.data.preferences,
                                      preference_labels_uri=c.data.preference_labels,
                                      validation=c.validation, tokenizer_path=c.base_model.path,
                                      chat_template=c.base_model.chat_template,
                                      round_dir=round_dir, data_dir=str(root / "data"), ctx=ctx))
        for k, v in {**select_metrics, **checked.metrics}.items():
            client.log_metric(rid, k, v)
        client.log_metric(rid, "feedback/new_pairs", checked.preferences.new_rows)
        client.set_tag(rid, "rlhf.dataset_version", checked.preferences.sha256[:12])
        client.set_tag(rid, "rlhf.flagged_annotators", ",".join(checked.flagged) or "none")
        if "agreement/alpha" in checked.metrics:  # searchable beside the metric
            client.set_tag(rid, "rlhf.agreement_alpha", f"{checked.metrics['agreement/alpha']:.3f}")
        for a in checked.flagged:
            log.warning("annotator %s flagged by the agreement checks", a)
        next_cfg = c.model_copy(deep=True)
        next_cfg.data.preferences = checked.preferences.uri
        next_cfg.data.preference_labels = checked.preference_labels.uri
        result = rlhf_pipeline(next_cfg, tags={"rlhf.feedback_round": rid})
        client.set_tag(rid, "rlhf.next_pipeline_run", result.parent_run_id)
        client.set_tag(rid, "rlhf.result", result.result)
    log.info("feedback round %d: %d new pairs (preferences-%s), next run %s",
             index, checked.preferences.new_rows, checked.preferences.sha256[:12], result.result)
    return RoundResult(round_run_id=rid, triggered_by=triggered_by.parent_run_id,
                       batch_uri=batch_uri, labels_uri=labels_uri, checked=checked,
                       pipeline=result, config=next_cfg)


def rounds_on_refusal(config: PipelineConfig, result: PipelineResult) -> bool:
    """Whether a run that ended with ``result`` goes on to feedback rounds: refused, with
    ``feedback.on_refusal: round`` and rounds to spend (``rlhf run`` and the nightly
    deployment both follow this)."""
    f = config.feedback
    return result.result != "promoted" and f.on_refusal == "round" and f.max_rounds > 0


@flow(name="rlhf-feedback-rounds")
@refusals_as_failed  # refused data or labels: a Failed run, no traceback (tasks/refusal.py)
def feedback_rounds(config: PipelineConfig, rounds: int | None = None,
                    first: PipelineResult | None = None) -> tuple[PipelineResult, list[RoundResult]]:
    """The pipeline (unless ``first`` is its result already), then up to ``rounds`` feedback
    rounds (default ``feedback.max_rounds``), stopping as soon as a run is promoted."""
    rounds = config.feedback.max_rounds if rounds is None else rounds
    result = first or rlhf_pipeline(config)
    done: list[RoundResult] = []
    while result.result != "promoted" and len(done) < rounds:
        r = feedback_round(config, result, index=len(done) + 1)
        done.append(r)
        config, result = r.config, r.pipeline
    return result, done
