"""The MLflow side of registry moves: snapshots in, plans applied with undo, versions created.

``release.aliases`` decides what to write; this module writes it through one MlflowClient
(passed in, so a test can hand it a client whose later calls fail) and undoes what it wrote
when a step fails: an alias move is all or nothing from the user's view, and a failed
registration leaves no version, logged model or registered model behind. MLflow has no
registry transactions, so a reader racing a failing move can glimpse the intermediate state
for the milliseconds before the undo.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from release.aliases import (KEY_TAG, REWARD_TAG, Change, DeleteAlias, DeleteTag, ModelState,
                             SetAlias, SetTag, UnknownVersion, Write, find_by_key, plan_promotion,
                             plan_rollback, reward_version_of, undo_writes)
from release.lock import registry_lock

log = logging.getLogger(__name__)

POLICY_CODE = Path(__file__).with_name("pyfunc.py")
"""The pyfunc model's code, logged with every policy version (MLflow models from code)."""
IGNORED_FILES = {"rlhf_lineage.json"}
"""Not part of a model's content: the lineage file names output folders, not weights."""


def local_dir(uri: str, scratch: str | None = None) -> Path:
    """A model directory URI as a local path (``s3://`` and other schemes are downloaded)."""
    if uri.startswith("file://") or "://" not in uri:
        from dataio import local_path

        return local_path(uri)
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch))


def content_key(model_uri: str, extra: dict[str, Any] | None = None) -> str:
    """sha256 over a model directory's top-level files (names and bytes) and ``extra``
    (settings that change what a version serves): equal keys, equal served behaviour."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as scratch:
        path = local_dir(model_uri, scratch)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name not in IGNORED_FILES)
        if not any(p.suffix in (".safetensors", ".bin") for p in files):
            raise FileNotFoundError(f"{model_uri}: no weights (*.safetensors, *.bin) to register")
        for p in files:
            file_hash = hashlib.sha256()
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    file_hash.update(chunk)
            digest.update(f"{p.name}\0{file_hash.hexdigest()}\n".encode())
    digest.update(json.dumps(extra or {}, sort_keys=True).encode())
    return digest.hexdigest()


def pip_requirements() -> list[str]:
    """What the pyfunc model imports, pinned to this environment; given explicitly because
    MLflow's requirement inference loads the model and trips over torchvision (STACK.md)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("mlflow", "torch",
                                                                  "transformers")]


def log_policy_model(tracking_uri: str, *, policy_uri: str, run_id: str,
                     generation: dict[str, Any], tags: dict[str, str]) -> str:
    """Log the policy directory as an MLflow Model linked to the policy's run; -> model id.

    The model gets its own LoggedModel (MLflow 3: artifacts under the experiment's
    ``models/<model_id>``), created in the run's experiment, not the process's active one.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    mlflow.set_tracking_uri(tracking_uri)  # Model.log reads the global URI
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(name="policy", source_run_id=run_id, tags=tags,
                                            experiment_id=experiment_id)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]), outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", DataType.long, int(generation["max_new_tokens"])),
            ParamSpec("temperature", DataType.double, float(generation["temperature"]))]))
    try:
        Model.log(artifact_path=None, name="policy", flavor=mlflow.pyfunc, run_id=run_id,
                  model_id=logged.model_id, python_model=str(POLICY_CODE),
                  artifacts={"policy": policy_uri}, model_config=dict(generation),
                  signature=signature, pip_requirements=pip_requirements())
    except BaseException:
        MlflowClient(tracking_uri).delete_logged_model(logged.model_id)
        raise
    return logged.model_id


@dataclass(frozen=True)
class Candidate:
    """What ``Registry.register`` needs: the policy and its reward model as URIs and runs."""

    policy_uri: str
    policy_run_id: str
    reward_uri: str
    reward_run_id: str
    generation: dict[str, Any]
    """Served defaults (max_new_tokens, temperature): part of the content key."""
    lineage: dict[str, str] = field(default_factory=dict)
    """Tags for both versions (data hashes, runs, code version)."""
    policy_tags: dict[str, str] = field(default_factory=dict)
    """Tags for the policy version only (evaluation, algorithm)."""


@dataclass(frozen=True)
class Registered:
    policy_version: str
    reward_version: str | None
    content_key: str
    reused: bool
    """True when a version with the same content key existed: nothing new was registered."""


def _is_missing(error: Exception) -> bool:
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


class _Created:
    """What a registration created, deleted again (last first) when a later step fails."""

    def __init__(self, client):
        self.client = client
        self.items: list[tuple[str, str, str | None]] = []  # (kind, name or id, version)

    def delete_all(self) -> None:
        delete = {"version": self.client.delete_model_version,
                  "registered model": lambda name, _: self.client.delete_registered_model(name),
                  "logged model": lambda model_id, _: self.client.delete_logged_model(model_id)}
        for kind, name, version in reversed(self.items):
            try:
                delete[kind](name, version)
            except Exception:  # keep deleting the rest; the original error is re-raised
                log.exception("could not delete %s %s %s", kind, name, version or "")


class Registry:
    """The policy's registered model and its reward model's, through one MlflowClient."""

    def __init__(self, tracking_uri: str, policy_name: str, reward_name: str, client=None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.policy_name, self.reward_name = policy_name, reward_name
        self.client = client or MlflowClient(tracking_uri)

    # -- reading ------------------------------------------------------------------------
    def versions(self, name: str) -> list:
        """Every ModelVersion of ``name`` (tags filled, aliases not: MLflow 3.17's search)."""
        from mlflow.exceptions import MlflowException

        found, token = [], None
        escaped = name.replace("'", "\\'")
        try:
            while True:
                page = self.client.search_model_versions(f"name='{escaped}'", page_token=token)
                found += page
                token = page.token
                if not token:
                    return found
        except MlflowException as e:
            if _is_missing(e):
                return []
            raise

    def snapshot(self, name: str) -> ModelState:
        """Aliases and version tags of ``name``; empty when it is not registered yet."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(name).aliases
        except MlflowException as e:
            if _is_missing(e):
                return ModelState(name)
            raise
        return ModelState(name, {a: str(v) for a, v in aliases.items()},
                          {str(v.version): dict(v.tags) for v in self.versions(name)})

    def state(self) -> tuple[ModelState, ModelState]:
        return self.snapshot(self.policy_name), self.snapshot(self.reward_name)

    # -- writing ------------------------------------------------------------------------
    def _write(self, w: Write) -> None:
        c = self.client
        if isinstance(w, SetAlias):
            c.set_registered_model_alias(w.model, w.alias, w.version)
        elif isinstance(w, DeleteAlias):
            c.delete_registered_model_alias(w.model, w.alias)
        elif isinstance(w, SetTag):
            c.set_model_version_tag(w.model, w.version, w.key, w.value)
        elif isinstance(w, DeleteTag):
            c.delete_model_version_tag(w.model, w.version, w.key)
        else:
            raise TypeError(f"not a registry write: {w!r}")

    def apply(self, changes: list[Change]) -> None:
        """Apply every change, or, if one fails, undo those applied (last first) and re-raise."""
        applied: list[Change] = []
        try:
            for change in changes:
                self._write(change.do)
                applied.append(change)
        except BaseException:
            for w in undo_writes(applied):
                try:
                    self._write(w)
                except Exception:  # keep undoing the rest; the original error is re-raised
                    log.exception("registry undo failed: %s", w)
            raise

    def register(self, candidate: Candidate, alias: str) -> Registered:
        """Register the candidate and point ``alias`` at it; a version with the same content
        key is reused. On failure, whatever was created here is deleted again and the aliases
        are as they were. One writer at a time (``release.lock``): the read, the plan and the
        writes see no other run's writes in between."""
        with registry_lock(self.tracking_uri, self.policy_name):
            return self._register(candidate, alias)

    def _register(self, candidate: Candidate, alias: str) -> Registered:
        policy, reward = self.state()
        key = content_key(candidate.policy_uri, candidate.generation)
        version = find_by_key(policy, key)
        if version is not None:  # an unchanged re-run: create nothing
            self.apply(plan_promotion(policy, reward, version, [alias]))
            return Registered(version, reward_version_of(policy.tags[version], self.reward_name),
                              key, reused=True)
        created = _Created(self.client)
        try:
            reward_version, reward = self._reward_version(candidate, reward, created)
            tags = {**candidate.lineage, **candidate.policy_tags, "rlhf.role": "policy",
                    REWARD_TAG: f"{self.reward_name}/{reward_version}", KEY_TAG: key}
            model_id = log_policy_model(self.tracking_uri, policy_uri=candidate.policy_uri,
                                        run_id=candidate.policy_run_id,
                                        generation=candidate.generation, tags={KEY_TAG: key})
            created.items.append(("logged model", model_id, None))
            version = self._create(created, self.policy_name, tags, source=f"models:/{model_id}",
                                   run_id=candidate.policy_run_id, model_id=model_id)
            self.apply(plan_promotion(policy.with_version(version, tags), reward, version,
                                      [alias]))
        except BaseException:
            created.delete_all()
            raise
        return Registered(version, reward_version, key, reused=False)

    def _reward_version(self, candidate: Candidate, reward: ModelState, created: _Created
                        ) -> tuple[str, ModelState]:
        """The reward-model version with the candidate's reward content key, created if new."""
        key = content_key(candidate.reward_uri)
        version = find_by_key(reward, key)
        if version is not None:
            return version, reward
        tags = {**candidate.lineage, "rlhf.role": "reward_model", KEY_TAG: key}
        source = self.client.get_run(candidate.reward_run_id).info.artifact_uri + "/model"
        version = self._create(created, self.reward_name, tags, source=source,
                               run_id=candidate.reward_run_id)
        return version, reward.with_version(version, tags)

    def _create(self, created: _Created, name: str, tags: dict[str, str], **source) -> str:
        """A new version of ``name`` (and ``name`` itself if new), recorded in ``created``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
            created.items.append(("registered model", name, None))
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self.client.create_model_version(name, tags={k: v[:5000] for k, v in tags.items()},
                                              **source)
        version = str(mv.version)  # an int from the SQL store, a str over REST
        created.items.append(("version", name, version))
        return version

    def move(self, version: str, aliases: list[str]) -> list[Change]:
        """Point each alias at policy ``version`` (and the reward model's at its reward
        version), all or nothing; -> the changes made (empty if already so)."""
        with registry_lock(self.tracking_uri, self.policy_name):
            return self._move(version, aliases)

    def _move(self, version: str, aliases: list[str]) -> list[Change]:
        policy, reward = self.state()
        if not policy.tags:
            raise UnknownVersion(f"no registered model {self.policy_name!r} at "
                                 f"{self.tracking_uri}: run the pipeline first")
        changes = plan_promotion(policy, reward, str(version), aliases)
        self.apply(changes)
        return changes

    def rollback(self, alias: str) -> tuple[str, str]:
        """Point ``alias`` back at the version it named before; -> (from, to)."""
        with registry_lock(self.tracking_uri, self.policy_name):
            policy, reward = self.state()
            current, target, changes = plan_rollback(policy, reward, alias)
            self.apply(changes)
        return current, target


@dataclass(frozen=True)
class VersionRow:
    """One line of ``rlhf models``."""

    version: str
    aliases: list[str]
    created_ms: int
    tags: dict[str, str]


def version_rows(registry: Registry) -> list[VersionRow]:
    """The policy's versions, newest first, with the aliases naming each."""
    state = registry.snapshot(registry.policy_name)
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(state.aliases.items()):
        by_version.setdefault(version, []).append(alias)
    rows = [VersionRow(str(v.version), by_version.get(str(v.version), []),
                       int(v.creation_timestamp or 0), dict(v.tags))
            for v in registry.versions(registry.policy_name)]
    return sorted(rows, key=lambda r: -int(r.version))


def versions_table(rows: list[VersionRow]) -> str:
    """A plain-text table: version, aliases, creation time and the headline evaluation."""
    import datetime as dt

    def metric(tags: dict[str, str], *keys: str) -> str:
        try:
            values = [float(json.loads(tags.get("rlhf.eval", "{}"))[k]) for k in keys]
        except (KeyError, ValueError, TypeError):
            return "-"
        return f"{values[0] - values[1]:+.3f}" if len(values) == 2 else f"{values[0]:.3f}"

    header = ("version", "aliases", "created (UTC)", "win_rate", "kl", "gold_gain", "reward_model")
    lines = [header]
    for r in rows:
        created = dt.datetime.fromtimestamp(r.created_ms / 1000, dt.timezone.utc)
        lines.append((r.version, ",".join(r.aliases) or "-", created.strftime("%Y-%m-%d %H:%M"),
                      metric(r.tags, "eval/win_rate"), metric(r.tags, "eval/kl_policy_sft"),
                      metric(r.tags, "eval/gold_policy", "eval/gold_sft"),
                      r.tags.get(REWARD_TAG, "-")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in lines)


def download_version(tracking_uri: str, name: str, version: str, dst: str) -> str:
    """The MLflow Model of ``name`` ``version`` downloaded into ``dst``; -> its local dir.

    Resolved through our client: ``download_artifacts("models:/...", registry_uri=...)``
    still asks the process-wide registry URI for the version (MLflow 3.17).
    """
    import mlflow
    from mlflow import MlflowClient

    location = MlflowClient(tracking_uri).get_model_version_download_uri(name, version)
    return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=dst,
                                               tracking_uri=tracking_uri)


def alias_version(tracking_uri: str, name: str, alias: str, client=None) -> str | None:
    """The version ``alias`` names, or None if the alias (or the model) does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = (client or MlflowClient(tracking_uri)).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if _is_missing(e) or e.error_code == "INVALID_PARAMETER_VALUE":
            return None
        raise
    return str(mv.version)


def champion_policy_dir(tracking_uri: str, name: str, alias: str = "production",
                        dst: str | None = None) -> str | None:
    """The local policy directory (safetensors + tokenizer) of the version ``alias`` names,
    downloaded under ``dst`` (a new temporary folder if None); None if no version has it."""
    from mlflow.models import Model

    version = alias_version(tracking_uri, name, alias)
    if version is None:
        return None
    local = download_version(tracking_uri, name, version,
                             dst or tempfile.mkdtemp(prefix="champion-"))
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    return str(Path(local) / artifacts["policy"]["path"])
