"""What every stage shares: the config base class and the small records stages hand on.

Stages hand each other URIs, run ids and content hashes, never tensors or model objects
(Prefect hashes task inputs for caching, and a model object would cost seconds per call).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageConfig(BaseModel):
    """Base of every stage config: unknown fields are errors, field docstrings are the docs.

    ``use_attribute_docstrings`` makes the docstring under each field its description, so a
    field is documented once, where it is declared, and ``rlhf config --help`` and the
    Prefect UI form read that same text.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)


class BaseModelConfig(StageConfig):
    """The model every stage starts from."""

    path: str
    """Hub id (e.g. ``Qwen/Qwen2.5-0.5B``) or local directory with config, weights, tokenizer."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local paths."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo; off unless you trust the repo."""


class TrackingContext(BaseModel):
    """Where a stage logs: MLflow is per thread, so tasks get the parent run id explicitly."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


class StageResult(BaseModel):
    """What a stage returns: where its outputs are and how to find its MLflow run."""

    stage: str
    run_id: str
    output_uri: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
