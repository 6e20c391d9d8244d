"""Entry points for Prefect deployments (``deploy/prefect.yaml``): a config path plus overrides.

A deployment's parameters must be JSON a scheduler or the UI can fill in, so these thin flows
take ``config_path`` and ``overrides`` (the same ``stage.field=value`` strings as ``rlhf run
--set``), load the config with ``flows.config.load_config`` and call the existing flows
unchanged: ``scheduled_pipeline`` does what ``rlhf run`` does (``rlhf_pipeline``, then feedback
rounds if the gate refuses and ``feedback.on_refusal`` says so), ``scheduled_feedback`` what
``rlhf feedback`` does (``feedback_rounds``: the pipeline, then rounds while the gate refuses).

Two runs must never write the same registered model at once (the gate moves its aliases,
a feedback round versions its data). Each deployment has ``concurrency_limit: 1`` (Prefect
enqueues a second run of the same deployment), but the nightly pipeline and the feedback
deployment are two deployments; so each entry point also holds one slot of a global
concurrency limit named after the registered policy for its whole run. Only the entry points
take it: ``feedback_rounds`` calls ``rlhf_pipeline`` inside, which would otherwise wait on its
own slot forever.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from prefect import flow, get_run_logger

from flows.config import load_config
from flows.feedback import feedback_rounds, rounds_on_refusal
from flows.pipeline import PipelineResult, rlhf_pipeline
from tasks.refusal import refusals_as_failed


def registry_limit_name(policy_name: str) -> str:
    """The global concurrency limit that guards one registered model (Prefect names allow
    no ``/`` or ``%``, registered-model names may hold them)."""
    return "rlhf-registry-" + re.sub(r"[^A-Za-z0-9_.-]", "-", policy_name)


def ensure_registry_limit(policy_name: str) -> str:
    """Create the registered model's limit (1 slot) if it is missing; returns its name.
    Prefect 3.9 refuses slots of a limit that does not exist (``create_if_missing`` is
    deprecated on /v2/concurrency_limits/increment), and creating it here means a deployment
    made with plain ``prefect deploy`` is guarded too, not only one made by ``rlhf schedule``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = registry_limit_name(policy_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)  # as it is: never reset it
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    return name


@contextmanager
def _registry_slot(policy_name: str):
    """Hold the registered model's slot for the block; waits while another run holds it."""
    from prefect.concurrency.sync import concurrency

    name = ensure_registry_limit(policy_name)
    log = get_run_logger()
    log.info("waiting for the %s slot (one run per registered model)", name)
    # strict: a slot we cannot take must stop the run, not let it write the registry unguarded.
    # The lease (300 s) is renewed while the run lives; a crashed run frees it when it lapses.
    with concurrency(name, occupy=1, strict=True):
        log.info("holding the %s slot", name)
        yield


@flow(name="rlhf-scheduled-pipeline")
@refusals_as_failed  # a bad config or refused data: a Failed run, no traceback (tasks/refusal.py)
def scheduled_pipeline(config_path: str = "configs/demo.yaml",
                       overrides: list[str] | None = None) -> PipelineResult:
    """``rlhf run``: the pipeline on ``config_path`` (relative to the checkout) with
    ``overrides`` (``stage.field=value``, as ``--set``); if the gate refuses and
    ``feedback.on_refusal`` is ``round``, feedback rounds until promotion or
    ``feedback.max_rounds``. Returns the last pipeline run's result."""
    cfg = load_config(config_path, overrides)
    with _registry_slot(cfg.registry.policy_name):
        result = rlhf_pipeline(cfg)
        if rounds_on_refusal(cfg, result):
            result, done = feedback_rounds(cfg, first=result)
            get_run_logger().info("%d feedback round(s); last run %s", len(done), result.result)
    return result


@flow(name="rlhf-scheduled-feedback")
@refusals_as_failed  # a bad config or refused data: a Failed run, no traceback (tasks/refusal.py)
def scheduled_feedback(config_path: str = "configs/demo.yaml",
                       overrides: list[str] | None = None,
                       rounds: int | None = None) -> PipelineResult:
    """``rlhf feedback``: the pipeline, then up to ``rounds`` feedback rounds (default
    ``feedback.max_rounds``) while the gate refuses; returns the last pipeline run's result."""
    cfg = load_config(config_path, overrides)
    with _registry_slot(cfg.registry.policy_name):
        final, done = feedback_rounds(cfg, rounds=rounds)
    get_run_logger().info("%d feedback round(s); last run %s", len(done), final.result)
    return final
