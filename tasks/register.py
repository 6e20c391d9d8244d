"""Register stage: every evaluated policy becomes a registry version; promotion moves aliases.

- ``register_candidate`` (after evaluate, always) registers the policy as an MLflow Model (and
  the reward model it was trained against) with lineage tags and its evaluation, and points
  the ``candidate`` alias at it. A version is keyed by the sha256 of what it serves (weights,
  tokenizer, generation settings): an unchanged re-run reuses its version.
- ``promote`` (after the gate says so) moves ``staging`` to the candidate, and ``production``
  too when ``registry.auto_production`` is on; otherwise ``rlhf promote VERSION --to
  production`` does. Each move records the version it replaced (``rlhf rollback``).

Registry stages are deprecated in MLflow 3, so stages are aliases. The alias rules are pure
(``release.aliases``); the MLflow writes, undone when a step fails, are ``release.registry``.
"""

from __future__ import annotations

import json

from prefect import task
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.base import ModelResult, PolicyResult, StageConfig, TrackingContext
from tasks.evaluate import EvaluateResult


class GenerationSettings(StageConfig):
    """How a served policy generates by default; a request's ``params`` may override them."""

    max_new_tokens: int = Field(128, gt=0)
    """Completion length cap (use the policy stage's response length); a completion never
    takes more than half of the model's context window."""
    temperature: float = Field(0.0, ge=0.0)
    """0 is greedy decoding (the same answer every time); above 0, sampling at it."""


class RegistryConfig(StageConfig):
    """Registered model names and the aliases that stand for registry stages."""

    policy_name: str = "rlhf-policy"
    """Registered model name for policies."""
    reward_name: str = "rlhf-reward-model"
    """Registered model name for the reward models the policies were trained against; its
    aliases follow the policy's."""
    candidate_alias: str = "candidate"
    """Alias of the newest evaluated policy, promoted or not."""
    staging_alias: str = "staging"
    """Alias the gate's promotion moves."""
    production_alias: str = "production"
    """Alias that serving reads (``rlhf serve``, ``models:/rlhf-policy@production``); moved by
    ``rlhf promote VERSION --to production``, or by the gate with ``auto_production``."""
    auto_production: bool = False
    """Move ``production`` as well when the gate promotes (no human decision in between)."""
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    """Generation defaults logged with each policy version's MLflow Model."""

    @field_validator("candidate_alias", "staging_alias", "production_alias")
    @classmethod
    def _valid_alias(cls, alias: str) -> str:
        from release.aliases import check_alias_name

        return check_alias_name(alias)

    @model_validator(mode="after")
    def _distinct_aliases(self) -> RegistryConfig:
        if len(set(self.aliases)) != len(self.aliases):
            raise ValueError(f"candidate, staging and production aliases must differ: "
                             f"{self.aliases}")
        return self

    @property
    def aliases(self) -> list[str]:
        """Every alias the pipeline and the CLI move, in promotion order."""
        return [self.candidate_alias, self.staging_alias, self.production_alias]

    def known_alias(self, alias: str) -> str:
        """``alias`` if it is one of ours, else UnknownAlias naming the ones that are."""
        from release.aliases import UnknownAlias

        if alias not in self.aliases:
            raise UnknownAlias(f"unknown alias {alias!r}: expected one of "
                               f"{', '.join(self.aliases)} (registry section of the config)")
        return alias


class Registration(BaseModel):
    """A policy version in the registry and the aliases naming it after this step."""

    policy_name: str
    policy_version: str
    reward_name: str
    reward_version: str | None
    """The reward-model version the policy was trained against (None if not recorded)."""
    aliases: list[str]
    content_key: str
    """sha256 of the policy's files and generation settings (version tag rlhf.content_key)."""
    reused: bool = False
    """True when an earlier version had the same content key: nothing new was registered."""


def candidate_tags(*, policy: PolicyResult, reward: ModelResult, sft: ModelResult,
                   evaluation: EvaluateResult, data_hashes: dict[str, str], parent_run_id: str,
                   code: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """-> (lineage tags for the policy and reward-model versions, tags for the policy only)."""
    lineage = {"rlhf.parent_run_id": parent_run_id, "rlhf.sft_run_id": sft.run_id,
               **{f"data.{k}.sha256": v for k, v in data_hashes.items()}, **code}
    policy_tags = {"rlhf.policy_run_id": policy.run_id, "rlhf.reward_run_id": reward.run_id,
                   "rlhf.algorithm": policy.algorithm, "rlhf.eval_run_id": evaluation.run_id,
                   "rlhf.eval": json.dumps(evaluation.metrics, sort_keys=True)}
    return lineage, policy_tags


def open_registry(cfg: RegistryConfig, tracking_uri: str, client=None):
    from release.registry import Registry

    return Registry(tracking_uri, cfg.policy_name, cfg.reward_name, client=client)


def registration(registry, cfg: RegistryConfig, version: str, reward_version: str | None,
                 content_key: str, reused: bool) -> Registration:
    """The record of ``version`` with the aliases that name it now (read back, not assumed)."""
    mv = registry.client.get_model_version(cfg.policy_name, version)
    return Registration(policy_name=cfg.policy_name, policy_version=version,
                        reward_name=cfg.reward_name, reward_version=reward_version,
                        aliases=sorted(mv.aliases), content_key=content_key, reused=reused)


def register_candidate(cfg: RegistryConfig, *, policy: PolicyResult, reward: ModelResult,
                       sft: ModelResult, evaluation: EvaluateResult, data_hashes: dict[str, str],
                       ctx: TrackingContext, client=None) -> Registration:
    """Register the evaluated policy (or find its version again) and point ``candidate`` at it.

    ``client``: an MlflowClient to write through (default: one for ``ctx.tracking_uri``).
    """
    from release.registry import Candidate
    from tasks.tracking import code_version

    registry = open_registry(cfg, ctx.tracking_uri, client)
    lineage, policy_tags = candidate_tags(policy=policy, reward=reward, sft=sft,
                                          evaluation=evaluation, data_hashes=data_hashes,
                                          parent_run_id=ctx.parent_run_id, code=code_version())
    done = registry.register(Candidate(
        policy_uri=policy.model_uri, policy_run_id=policy.run_id, reward_uri=reward.model_uri,
        reward_run_id=reward.run_id, generation=cfg.generation.model_dump(), lineage=lineage,
        policy_tags=policy_tags), cfg.candidate_alias)
    registry.client.set_tag(ctx.parent_run_id, "registry.candidate_version", done.policy_version)
    registry.client.set_tag(ctx.parent_run_id, "registry.reused", str(done.reused).lower())
    return registration(registry, cfg, done.policy_version, done.reward_version,
                        done.content_key, done.reused)


def promote(cfg: RegistryConfig, *, candidate: Registration, ctx: TrackingContext,
            client=None) -> Registration:
    """Move ``staging`` (and ``production`` with ``auto_production``) to the candidate."""
    registry = open_registry(cfg, ctx.tracking_uri, client)
    aliases = [cfg.staging_alias] + ([cfg.production_alias] if cfg.auto_production else [])
    registry.move(candidate.policy_version, aliases)
    registry.client.set_tag(ctx.parent_run_id, "registry.policy_version",
                            candidate.policy_version)
    return registration(registry, cfg, candidate.policy_version, candidate.reward_version,
                        candidate.content_key, candidate.reused)


class Champion(BaseModel):
    """The production version a candidate must beat, downloaded."""

    version: str
    policy_dir: str


def find_champion(cfg: RegistryConfig, *, policy: PolicyResult, out_dir: str,
                  ctx: TrackingContext) -> Champion | None:
    """The ``production`` version's policy, or None when there is none or when it is the
    candidate itself (same content key: an unchanged re-run has nothing to beat)."""
    from mlflow import MlflowClient

    from release.aliases import KEY_TAG
    from release.registry import alias_version, champion_policy_dir, content_key

    version = alias_version(ctx.tracking_uri, cfg.policy_name, cfg.production_alias)
    if version is None:
        return None
    tags = MlflowClient(ctx.tracking_uri).get_model_version(cfg.policy_name, version).tags
    if tags.get(KEY_TAG) == content_key(policy.model_uri, cfg.generation.model_dump()):
        return None
    policy_dir = champion_policy_dir(ctx.tracking_uri, cfg.policy_name, cfg.production_alias,
                                     dst=f"{out_dir}/v{version}")
    return Champion(version=version, policy_dir=policy_dir)


champion_task = task(name="champion")(find_champion)
register_task = task(name="register")(register_candidate)
promote_task = task(name="promote")(promote)
