"""Content-addressed stages: a stage whose key is unchanged is not run again, it is reused.

A stage's key is the sha256 of

- its name and its **code version**: the source of the stage's module and of every project
  module it imports, transitively, imports inside functions included (an edit anywhere in the
  code a stage runs re-runs it, comments included: a stale model is worse than a retrain),
  plus the versions of the libraries that compute its numbers (torch, transformers, ...);
- its **inputs**, that is the task's parameters except ``ctx`` (a new parent run every run)
  and ``out_dir`` (named after the key): configs as JSON (``StageConfig.key_dump``, so a
  policy config keys only the chosen algorithm's settings), typed upstream results as JSON,
  and every file or directory input (``*_uri``, ``*_path``, ``data``, ``base_model.path``, a
  ``chat_template`` file) by the sha256 of its bytes, and the code version of any module a
  config names (``StageConfig.code_modules``: the gold judge). Content, not upstream keys: an
  upstream stage that re-runs and writes the same bytes leaves its downstream stages reused.

We chose source hashing over a hand-bumped ``CODE_VERSION`` per stage: a forgotten bump
silently reuses a model trained by old code, the very failure this module exists to prevent;
the price is that a cosmetic edit re-runs the stages that import the edited module.

Prefect does the skipping (``Stages.run``): the task runs with the cache policy ``StageKey``
and its typed result persisted as JSON to ``<root>/<stage>-<key12>/result.json``, the stage's
own folder (``root`` is ``output_dir/name``). That file is written after the task returns,
so after its model is saved: it is the stage's completion marker. A folder without it (an
interrupted stage) is run again in place, which is how PPO resumes from its checkpoint; a
folder deleted by hand, or a half-written record that does not parse, is a cache miss.
``PREFECT_TASKS_REFRESH_CACHE=true`` re-runs every stage and overwrites the records.

A reused stage says so: a log line naming the stage, the earlier MLflow run and the key, a
child run under this pipeline run tagged ``rlhf.reused_from=<earlier run id>`` (with the
earlier run's headline metrics, so pipeline runs still compare stage by stage) and a tag
``rlhf.reused.<stage>`` on the parent run. Every stage run carries its key (``rlhf.cache_key``).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from pydantic import BaseModel

from dataio import DataError, local_path
from tasks.base import BaseModelConfig, StageConfig, StageResult, TrackingContext
from tasks.refusal import Refused

RESULT_FILE = "result.json"
"""The stage's typed result, written by Prefect into the stage's folder when it finished."""
NOT_KEYED = ("ctx", "out_dir")
"""Task parameters that never enter a key: the parent run changes every run, and the output
folder is named after the key."""
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
             "safetensors", "numpy", "pandas", "great_expectations")
"""Libraries whose version changes what a stage computes."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --- the key -------------------------------------------------------------------------------


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """One file's sha256, memoised on (path, size, mtime): a key is computed twice per stage
    (by the flow to name the folder, by Prefect to find the record) and an input feeds many."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(uri: str | None) -> str | None:
    """sha256 of a local file's bytes, or of a directory's files (relative names and bytes;
    a stage's own ``result.json`` excluded); a URI that is no local file (a hub id: its
    ``revision`` is in the config) stands for itself."""
    if uri is None:
        return None
    try:
        path = local_path(uri)
    except DataError:
        return f"uri:{uri}"
    try:
        if not path.exists():
            return f"uri:{uri}"
    except OSError:  # not a path at all: e.g. a chat template written out in the config
        return f"uri:{uri}"
    files = ([path] if path.is_file() else
             sorted(p for p in path.rglob("*") if p.is_file() and p.name != RESULT_FILE))
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        rel = "" if p == path else str(p.relative_to(path))  # a file: its bytes, not its name
        h.update(f"{rel}\0{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}\n".encode())
    return h.hexdigest()


def _is_file_input(name: str) -> bool:
    """Parameters that name files or directories (``chat_template``: a path, or the template
    itself, which then stands for itself)."""
    return name.endswith(("_uri", "_path")) or name in ("data", "chat_template")


def key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The task's inputs as the key sees them: JSON, with file inputs replaced by content."""
    def canon(name: str, value: Any) -> Any:
        if isinstance(value, BaseModelConfig):
            return {**value.key_dump(), "path.sha256": fingerprint(value.path),
                    "chat_template.sha256": fingerprint(value.chat_template)}
        if isinstance(value, StageConfig):
            return {**value.key_dump(),
                    **{f"code:{m}": code_version(m) for m in value.code_modules()}}
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        if _is_file_input(name) and isinstance(value, dict):
            return {k: fingerprint(v) for k, v in value.items()}
        if _is_file_input(name) and (value is None or isinstance(value, str)):
            return fingerprint(value)
        return value

    return {name: canon(name, v) for name, v in sorted(inputs.items()) if name not in NOT_KEYED}


def _module_file(name: str) -> Path | None:
    """A project module's source file (no import needed), or None for anything else."""
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name ``source`` imports, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(parts[:len(parts) - node.level + 1] if node.level else [])
            base = ".".join(p for p in (base, node.module) if p)
            names.add(base)
            # ``from pkg import mod`` imports a module; ``from mod import name`` does not, and
            # _module_file ignores the names that are not files.
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


@functools.cache
def _module_source(name: str) -> tuple[str, list[str]]:
    """A project module's source sha256 and the module names it imports (parsed once)."""
    path = _module_file(name)
    text = path.read_text(encoding="utf-8")
    return (hashlib.sha256(text.encode()).hexdigest(),
            sorted(_imported_names(text, name, path.name == "__init__.py")))


@functools.cache
def code_version(module: str) -> str:
    """sha256 over the source of ``module`` and the project modules it imports, transitively,
    and the versions of ``LIBRARIES``."""
    sources: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in sources or _module_file(name) is None:
            continue
        sources[name], imports = _module_source(name)
        # ``import a.b`` also runs ``a/__init__.py``.
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += imports
    blob = json.dumps({"modules": sources, "libraries": library_versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.cache
def library_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            found[lib] = version(lib.replace("_", "-"))
        except PackageNotFoundError:
            found[lib] = None
    return found


def flat_inputs(fn, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` by parameter name, a ``**kwargs`` parameter's entries spread out (a task
    ``f(cfg, *, launch, **inputs)`` is keyed, and called, by the names it passes on)."""
    var_kw = [n for n, p in inspect.signature(fn).parameters.items()
              if p.kind is inspect.Parameter.VAR_KEYWORD]
    flat = {k: v for k, v in inputs.items() if k not in var_kw}
    for name in var_kw:
        flat.update(inputs.get(name) or {})
    return flat


def stage_key(stage: str, module: str, inputs: dict[str, Any]) -> str:
    """The stage's key: sha256 of its name, code version and keyed inputs."""
    blob = json.dumps({"stage": stage, "code": code_version(module),
                       "inputs": key_inputs(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_folder(stage: str, key: str) -> str:
    """The stage's folder name under the pipeline's root: ``<stage>-<first 12 of the key>``."""
    return f"{stage}-{key[:12]}"


@dataclass
class StageKey(CachePolicy):
    """Prefect cache policy: the record of a finished stage is ``<stage>-<key12>/result.json``
    under the task's result storage (the pipeline's root)."""

    stage: str = ""
    module: str = ""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:
        key = stage_key(self.stage, self.module, flat_inputs(task_ctx.task.fn, inputs))
        return f"{stage_folder(self.stage, key)}/{RESULT_FILE}"


# --- in the flow ---------------------------------------------------------------------------


def record_reuse(ctx: TrackingContext, stage: str, result: StageResult | Any,
                 key: str) -> str:
    """A child run for a reused stage under this pipeline run: tagged ``rlhf.reused_from``
    (the run that did the work and holds its artifacts) and carrying its headline metrics;
    the parent gets ``rlhf.reused.<stage>``. -> the new child run's id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(ctx.tracking_uri)
    earlier = result.run_id
    tags = {"mlflow.parentRunId": ctx.parent_run_id, "rlhf.stage": stage,
            "rlhf.reused_from": earlier, "rlhf.cache_key": key,
            "mlflow.note.content": f"Reused: the {stage} stage's key matched run {earlier}, "
                                   f"which did the work and holds its artifacts; nothing ran."}
    if getattr(result, "algorithm", None):
        tags["rlhf.algorithm"] = result.algorithm
    run_id = client.create_run(ctx.experiment_id, run_name=stage, tags=tags).info.run_id
    metrics = getattr(result, "metrics", None) or {}
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED")
    client.set_tag(ctx.parent_run_id, f"rlhf.reused.{stage}", earlier)
    return run_id


class Stages:
    """The flow's handle on content-addressed stages: where their folders and results live
    (``root``) and which pipeline run they report to (``ctx``)."""

    def __init__(self, root: str | Path, ctx: TrackingContext):
        self.root, self.ctx = Path(root), ctx
        self.reused: dict[str, str] = {}
        """Stage -> the earlier run it was reused from, for this pipeline run."""

    def run(self, stage_task, /, *args: Any, **kwargs: Any):
        """Call ``stage_task`` with ``ctx`` (and ``out_dir``, the stage's folder, if it takes
        one) unless its key has a finished record, whose typed result is then returned."""
        from mlflow import MlflowClient
        from prefect import get_run_logger

        stage, module = stage_task.name, stage_task.fn.__module__
        signature = inspect.signature(stage_task.fn)
        bound = signature.bind_partial(*args, **kwargs)
        # Defaults passed explicitly: Prefect's cache policy then sees the same inputs.
        bound.apply_defaults()
        inputs = flat_inputs(stage_task.fn, bound.arguments)
        key = stage_key(stage, module, inputs)
        folder = self.root / stage_folder(stage, key)
        # A task passing ``**inputs`` on to its stage function (tasks/launch.py) takes one too.
        takes_out_dir = "out_dir" in signature.parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
        extra = {"ctx": self.ctx, **({"out_dir": str(folder)} if takes_out_dir else {})}
        configured = stage_task.with_options(
            cache_policy=StageKey(stage=stage, module=module), persist_result=True,
            result_storage=self.root.resolve(), result_serializer="json")
        state = configured(**inputs, **extra, return_state=True)
        result = state.result()  # raises the stage's own error if it failed
        if isinstance(result, Refused):  # nothing ran to record; the flow raises it
            return result
        log = get_run_logger()
        if state.name == "Cached":
            record_reuse(self.ctx, stage, result, key)
            self.reused[stage] = result.run_id
            log.info("%s: reused from run %s (key %s, %s)", stage, result.run_id, key[:12],
                     folder)
        else:
            if result.run_id:
                MlflowClient(self.ctx.tracking_uri).set_tag(result.run_id, "rlhf.cache_key", key)
            log.info("%s: ran as run %s (key %s, %s)", stage, result.run_id, key[:12], folder)
        return result
