"""MLflow helpers: one parent run per pipeline run, one child run per stage.

MLflow's active run is per thread and Prefect may run a task in a worker thread, so stages
never rely on the active run: they get a ``TrackingContext`` with the parent run id and open
their own child run with ``parent_run_id``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from dataio.uri import redact, redact_tree
from tasks.base import TrackingContext

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else ``MLFLOW_TRACKING_URI``, else MLflow 3's default sqlite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def open_store(uri: str | None = None) -> None:
    """Import MLflow and open the tracking and registry stores now, so that the run's first
    MLflow call finds them open (MLflow keeps one store per URI): the CLI calls this while
    Prefect's temporary API boots. A database store is opened, and its schema checked, on
    first use; a server (``http://``) is only contacted by the run itself."""
    from mlflow import MlflowClient

    uri = tracking_uri(uri)
    if uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


def artifact_location(uri: str, experiment: str, root: str | None = None) -> str | None:
    """Where a new experiment's artifacts go: ``<root>/<experiment>`` if a root is configured;
    beside a SQLite database (``<its folder>/mlruns/<experiment>``, an absolute ``file://``
    URI); otherwise None, so the tracking store decides: an ``mlflow server`` proxies them to
    its ``--artifacts-destination`` (``mlflow-artifacts:/``) and clients need no storage
    credentials.

    Without this, MLflow puts a SQLite store's artifacts in ``./mlruns`` of whatever folder the
    process runs in, away from the database the runs are in. The experiment's name, not its
    id, names the folder: the id is only known once the experiment exists, and MLflow keeps an
    experiment's location for good once it is created.
    """
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "experiment"
    if root:
        return f"{root.rstrip('/')}/{folder}"
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlruns" / folder).as_uri()
    return None


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b.c": value} for ``log_params`` (MLflow params are flat strings)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


class RedactingFilter(logging.Filter):
    """Masks credentials (``dataio.uri.redact``) in a log record, message and traceback,
    before any handler writes it: Prefect's console handler and its API handler (the logs in
    Prefect's database and UI) alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_REDACTING = RedactingFilter()


def redact_logs() -> None:
    """Put ``RedactingFilter`` on every handler configured now (idempotent). Handler filters,
    not logger filters: a record from a child logger (``prefect.task_runs``, ``mlflow``,
    ``transformers``) reaches the handlers of its parents without passing their filters."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for handler in lg.handlers:
            if _REDACTING not in handler.filters:
                handler.addFilter(_REDACTING)


def config_params(config: BaseModel) -> dict[str, str]:
    """A config as MLflow params: flat, redacted (``dataio.uri.redact``), capped at the 6000
    characters ``log_params`` takes. Configs refuse credentials, but a secret that reached one
    another way (an environment value in a path) still never lands in the store."""
    return {k: redact(str(v))[:6000] for k, v in flatten(config).items()}


def config_dump(config: BaseModel) -> dict[str, Any]:
    """A config as the JSON artifact ``config/<stage>.json``, redacted like ``config_params``."""
    return redact_tree(config.model_dump(mode="json"))


@contextlib.contextmanager
def stage_run(ctx: TrackingContext, stage: str, config: BaseModel | None = None,
              seed: int | None = None, algorithm: str | None = None) -> Iterator[Any]:
    """Open the stage's child run under the pipeline's parent run and log config and seed.

    The run is named after the stage (``policy``, not ``ppo``), so runs compare across
    algorithms; ``algorithm`` goes in the ``rlhf.algorithm`` tag.
    """
    import mlflow

    tags = {"rlhf.stage": stage, **({"rlhf.algorithm": algorithm} if algorithm else {})}
    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(run_name=stage, experiment_id=ctx.experiment_id,
                          parent_run_id=ctx.parent_run_id, nested=True, tags=tags) as run:
        if config is not None:
            mlflow.log_params(config_params(config))
            mlflow.log_dict(config_dump(config), f"config/{stage}.json")
        if seed is not None:
            mlflow.log_param("seed", seed)
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_model_dir(local_dir: str | Path, artifact_path: str) -> str:
    """Log a saved model directory (safetensors + tokenizer); returns its artifact URI."""
    import mlflow

    mlflow.log_artifacts(str(local_dir), artifact_path)
    return mlflow.get_artifact_uri(artifact_path)


def code_version(repo: str | Path | None = None) -> dict[str, str]:
    """The git commit of the code that runs (``rlhf.git_commit``, ``rlhf.git_dirty``: whether
    tracked files differ from it); empty where there is no git or no repository."""
    import subprocess

    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"rlhf.git_commit": commit, "rlhf.git_dirty": str(dirty).lower()}


def trainer_metrics_callback(prefix: str, run_id: str, rename: dict[str, str] | None = None):
    """A TrainerCallback forwarding a trainer's logs to one MLflow run as ``prefix/<name>``.

    Trainers run with ``report_to="none"``: we log ourselves so the metrics land on the
    stage's child run (MLflow's active run is per thread) and nothing is logged twice.
    ``rename`` maps trainer names to ours (e.g. TRL's ``kl`` -> PPO's ``objective/kl``) so
    dashboards compare like with like. ``.last`` keeps the latest value of each metric.
    """
    import mlflow
    from transformers import TrainerCallback

    rename = rename or {}

    class MetricsCallback(TrainerCallback):
        def __init__(self):
            self.last: dict[str, float] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            numeric = {f"{prefix}/{rename.get(k, k)}": float(v) for k, v in (logs or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                self.last.update(numeric)
                mlflow.log_metrics(numeric, step=state.global_step, run_id=run_id)

    return MetricsCallback()


def trainer_args(config_cls, scratch: str, seed: int, save_steps: int = 0, **extra):
    """A TRL/transformers trainer config with what every stage here shares: our own MLflow
    logging (``report_to="none"``), seeded data order, progress bars on, and a checkpoint in
    ``scratch`` every ``save_steps`` steps (0: none), only the newest kept, to resume from
    after a kill (``tasks.durable``)."""
    saving = ({"save_strategy": "steps", "save_steps": save_steps, "save_total_limit": 1}
              if save_steps > 0 else {"save_strategy": "no"})
    return config_cls(
        output_dir=scratch, seed=seed, data_seed=seed, report_to="none", **saving,
        # TRL defaults both on for large GPU models; on CPU bf16 autocast is slow and lossy and
        # gradient checkpointing only costs time.
        bf16=False, gradient_checkpointing=False, disable_tqdm=False,
        # On by default, it logs a NaN loss as the mean of the finite ones before it: a silent
        # gap. Off, the NaN reaches the logs and tasks.durable's callback stops the stage.
        logging_nan_inf_filter=False, **extra)


def save_policy(model, tokenizer, out_dir: str | Path, lineage: dict[str, Any],
                merge_lora: bool) -> Path:
    """Write ``out_dir/policy`` (safetensors + tokenizer + rlhf_lineage.json) and log it as
    artifact "model"; LoRA adapters are merged first so evaluate and serving need no peft."""
    import json

    from tasks.durable import atomic_dir

    policy_dir = Path(out_dir) / "policy"
    if merge_lora:
        model = model.merge_and_unload()
    with atomic_dir(policy_dir) as tmp:  # disk full: no half-written policy to evaluate
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rlhf_lineage.json").write_text(json.dumps(lineage, indent=2))
    log_model_dir(policy_dir, "model")
    return policy_dir


def log_dataset_input(tracking_uri: str, run_id: str, name: str, frame, uri: str,
                      sha256: str) -> None:
    """A dataset as an input of ``run_id`` (MLflow's inputs tab), named ``<name>@<sha12>``;
    list and dict cells are stored as JSON (MLflow's pandas dataset wants scalars)."""
    import json

    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    df = frame.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
    ds = mlflow.data.from_pandas(df, source=redact(uri), name=f"{name}@{sha256[:12]}")
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=[DatasetInput(
        dataset=ds._to_mlflow_entity(),
        tags=[InputTag(key="mlflow.data.context", value=name),
              InputTag(key="sha256", value=sha256)])])


class PipelineRun:
    """The pipeline's MLflow parent run, as the flow sees it: the ``TrackingContext`` stages
    open their child runs from, plus what the flow itself records on the parent."""

    def __init__(self, client, ctx: TrackingContext):
        self.client, self.ctx = client, ctx

    def tag_data(self, hashes: dict[str, str]) -> None:
        """The content hash of every dataset, so runs on the same data are found by tag."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.ctx.parent_run_id, tags=[
            RunTag(f"data.{name}.sha256", h) for name, h in hashes.items()])

    def record(self, result: str, metrics: dict[str, float]) -> None:
        """The outcome and the headline metrics, so pipeline runs compare side by side.

        One ``log_batch`` (MLflow takes up to 1000 metrics in one), not one write per metric:
        the demo's ~90 evaluation metrics cost ~90 SQLite transactions, seconds on a busy
        machine (bench/bench_pipeline.py)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.ctx.parent_run_id, metrics=batch[i:i + 1000])
        self.client.set_tag(self.ctx.parent_run_id, "rlhf.result", result)


@contextlib.contextmanager
def pipeline_run(name: str, experiment: str, uri: str | None, config: BaseModel,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 artifacts: str | None = None) -> Iterator[PipelineRun]:
    """Open a top-level run (``<name>-pipeline`` unless ``run_name``; full config as params and
    ``config/pipeline.json``; ``tags`` set at creation, so even a run that crashes carries
    them); close it FINISHED, or FAILED with the error in ``rlhf.error``, whatever happens.
    A new experiment's artifacts go to ``artifact_location(uri, experiment, artifacts)``."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=artifact_location(uri, experiment, artifacts))
    # MLflow 3's UI opens an experiment in its GenAI view (traces, evaluation runs) unless
    # the experiment says it is model training (the value its UI's EXPERIMENT_KIND list uses).
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "custom_model_development")
    run_id = client.create_run(exp_id, run_name=run_name or f"{name}-pipeline",
                               tags={"rlhf.pipeline": name, **(tags or {})}).info.run_id
    # One batch per 100 params (MLflow's limit), not one call each: ~180 single writes took
    # 16 s on a busy 2-core machine, a large share of an unchanged re-run (tasks/cache.py).
    params = [Param(k, v) for k, v in config_params(config).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    client.log_dict(run_id, config_dump(config), "config/pipeline.json")
    try:
        yield PipelineRun(client, TrackingContext(tracking_uri=uri, experiment_id=exp_id,
                                                  parent_run_id=run_id))
    except BaseException as e:
        client.set_tag(run_id, "rlhf.error", redact(f"{type(e).__name__}: {e}")[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
