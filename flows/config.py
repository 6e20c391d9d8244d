"""The pipeline config: one YAML file per pipeline, parsed into typed per-stage configs.

Each stage's config class lives beside its stage in ``tasks/`` and is documented there once;
this module only composes them and applies ``--set stage.field=value`` overrides. Any wrong
or unknown field fails here, before any work, with a message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dataio.uri import credentials_in
from flows import DEFAULT_CONFIG
from models.loading import unsafe_weights
from tasks.base import BaseModelConfig, StageConfig
from tasks.evaluate import EvaluateConfig
from tasks.feedback import FeedbackConfig
from tasks.gate import GateConfig
from tasks.launch import LaunchConfig
from tasks.policy import PolicyConfig
from tasks.register import RegistryConfig
from tasks.refusal import Refusal
from tasks.reward import RewardConfig
from tasks.sft import SFTConfig
from tasks.validation import ValidationConfig



class ConfigError(Refusal, ValueError):
    """A config that cannot be used; the message names the file and the field (a refusal:
    a scheduled run ends Failed with it, no traceback)."""


class DataConfig(StageConfig):
    """Where the pipeline's datasets are: JSONL, Parquet or `datasets` directories (TRL formats)."""

    sft: str
    """SFT demonstrations: prompt/completion, or conversational ``messages``."""
    preferences: str
    """Training preference pairs: prompt/chosen/rejected (standard or conversational)."""
    preference_labels: str | None = None
    """Optional per-annotator votes (pair_id, annotator_id, preferred) for agreement checks."""
    rl_prompts: str
    """Prompts for policy optimisation (prompt-only format)."""
    eval_prompts: str
    """Held-out prompts for evaluation; must not overlap the training prompts."""
    eval_pairs: str
    """Held-out preference pairs for reward-model accuracy and calibration."""


class TrackingConfig(StageConfig):
    """MLflow tracking."""

    uri: str | None = None
    """Tracking URI; empty means ``MLFLOW_TRACKING_URI`` or else ``sqlite:///mlflow.db``."""
    experiment: str = "rlhf-pipeline"
    """MLflow experiment name; one parent run per pipeline run goes here."""
    artifact_location: str | None = None
    """Root of a new experiment's artifacts, ``<root>/<experiment>`` (e.g. ``s3://bucket/mlflow``,
    written with this machine's AWS credentials); empty: beside a SQLite database
    (``<its folder>/mlruns/<experiment>``), or wherever an ``mlflow server`` keeps them (proxied:
    clients need no storage credentials). An existing experiment keeps its location."""


class PipelineConfig(StageConfig):
    """A whole pipeline: validate -> SFT -> reward model -> policy -> evaluate -> gate, and
    the feedback rounds that follow a refusal."""

    name: str = "rlhf"
    """Pipeline name, used in run names."""
    seed: int = 0
    """Global seed; every stage logs it and seeds torch, python and numpy from it."""
    output_dir: str = "runs"
    """Where stage outputs go (saved models, checkpoints, reports, feedback batches, dataset
    versions), one subfolder per pipeline name: a local directory, or ``s3://bucket/prefix``
    (stages then work in a local scratch folder under ``$RLHF_CACHE_DIR/outputs`` and each
    finished stage is uploaded to ``<output_dir>/<name>/<stage>-<key>/``, its record last;
    ``tasks.outputs``). Credentials come from the AWS environment or profile."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    """Training stages in several processes (GPUs) under ``accelerate launch``."""
    data: DataConfig
    base_model: BaseModelConfig
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    """Human-feedback rounds after a refused run (``rlhf feedback``)."""

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: str) -> str:
        # Path("gs://b/x") would be the local folder "gs:/b/x": refuse it rather than write there.
        if value.startswith("s3://"):
            if not value[len("s3://"):].partition("/")[0]:
                raise ValueError(f"{value!r}: an S3 output_dir names a bucket: s3://bucket/prefix")
            return value.rstrip("/")
        if "://" in value and not value.startswith("file://"):
            raise ValueError(f"{value!r}: output_dir is a local folder or s3://bucket/prefix")
        return value.removeprefix("file://")

    @model_validator(mode="after")
    def _no_credentials(self) -> "PipelineConfig":
        """Every string of the config, URIs or not, is free of credentials: the config is
        logged as MLflow params, stored with the Prefect flow run and printed by ``rlhf
        config``. Checked over all fields so a field added later is covered too."""
        found = [f"{key}: {why}" for key, value in _strings(self.model_dump(mode="json"))
                 if (why := credentials_in(value))]
        if found:
            raise ValueError(
                "credentials in the config (rule no_credentials_in_config): " + "; ".join(found)
                + ". Give them through the environment instead: MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for the tracking server, "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for S3, HF_TOKEN for the hub")
        return self

    @model_validator(mode="after")
    def _safe_weights(self) -> "PipelineConfig":
        """A local base model with pickled weights only is refused now, not in the SFT task
        (where the loader refuses it too, ``models.loading.UnsafeWeights``)."""
        if why := unsafe_weights(self.base_model.path):
            raise ValueError(f"base_model.path: {why} (rule safetensors_only)")
        return self


def _strings(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field, value) for every string in a config dump."""
    if isinstance(tree, dict):
        return [kv for k, v in tree.items() for kv in _strings(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [kv for i, v in enumerate(tree) for kv in _strings(v, f"{prefix}{i}.")]
    return [(prefix[:-1], tree)] if isinstance(tree, str) else []


def _set_path(tree: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (``1e-4``, ``true``)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected stage.field=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), raw)
    # An empty tracking.uri means MLFLOW_TRACKING_URI: the URI every stage, the flow's result
    # and `rlhf run`'s summary carry, so it is held to the config's rule.
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    tracking = tree.get("tracking")
    configured = tracking.get("uri") if isinstance(tracking, dict) else None
    if not configured and (why := credentials_in(env_uri)):
        raise ConfigError(f"MLFLOW_TRACKING_URI {why} (rule no_credentials_in_config): set "
                          f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                          f"MLFLOW_TRACKING_TOKEN) instead")
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            # A whole-config rule (no location) names its fields itself. No `input`: the
            # offending value may be a secret.
            lines.append(f"  {field}: {msg}" if field else f"  {msg}")
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(lines)) from None
