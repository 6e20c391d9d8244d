"""What every stage shares: the config base class and the small records stages hand on.

Stages hand each other URIs, run ids and content hashes, never tensors or model objects
(each stage's cache key hashes its inputs, ``tasks.cache``: a path is hashed by content, a
model object could not be).
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

    def key_dump(self) -> dict[str, Any]:
        """What of this config determines the stage's output, for its cache key
        (``tasks.cache``): all of it, unless a config knows better."""
        return self.model_dump(mode="json")

    def code_modules(self) -> list[str]:
        """Modules this config names by string (e.g. a judge's ``module:function``), whose
        source keys the stage like its own code (``tasks.cache.code_version``)."""
        return []


class BaseModelConfig(StageConfig):
    """The model every stage starts from."""

    path: str
    """Hub id (e.g. ``Qwen/Qwen2.5-0.5B``), local directory with config, weights, tokenizer,
    or such a directory on S3 (``s3://bucket/prefix``, downloaded once into the cache)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local paths."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo; off unless you trust the repo."""
    chat_template: str | None = None
    """A Jinja chat template string, or a path to a ``.jinja`` file, used when the base
    model's tokenizer has none (conversational data is rendered with it; if the tokenizer has
    its own, this replaces it). SFT saves it with its tokenizer, so every later stage uses it."""


class LoraSettings(StageConfig):
    """Low-rank adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685) via peft."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. ``["q_proj", "v_proj"]``), or peft's ``"all-linear"``."""


def peft_config(lora: LoraSettings | None, task_type: str, modules_to_save: list[str] | None = None):
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type,
                      modules_to_save=modules_to_save)


class TrackingContext(BaseModel):
    """Where a stage logs: MLflow is per thread, so tasks get the parent run id explicitly."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str


class StageResult(BaseModel):
    """What every stage returns: its name, its MLflow child run and its headline metrics.

    Each stage subclasses this with the few typed fields the next stages read (URIs, hashes,
    step counts), so the flow never digs in an untyped dict.
    """

    stage: str
    run_id: str
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelResult(StageResult):
    """A stage that trains a model: where the saved model (safetensors + tokenizer) is."""

    model_uri: str


class PolicyResult(ModelResult):
    """The policy stage, whichever algorithm ran: the gate reads how training ended."""

    algorithm: str
    steps: int
    planned_steps: int
    stop_reason: str | None = None
    """Why training stopped before ``planned_steps`` (e.g. a KL budget); None if it did not."""
