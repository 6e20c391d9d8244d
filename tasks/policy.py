"""Policy-optimisation stage: chooses the algorithm (``policy.algorithm``) and runs it.

Every algorithm takes the SFT model and the reward model (or the preference data) and
returns the same ``StageResult`` (a saved policy directory and an MLflow child run), so the
evaluate and gate stages do not care which one ran.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from prefect import task

from tasks.base import StageConfig, StageResult, TrackingContext
from tasks.ppo import PPOConfig, run_ppo


class PolicyConfig(StageConfig):
    """Which policy optimiser runs, and its settings."""

    algorithm: Literal["ppo"] = "ppo"
    """Policy optimiser: ``ppo`` (ours, KL-penalised)."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)


def run_policy(cfg: PolicyConfig, *, sft_model_uri: str, reward_model_uri: str, prompts_uri: str,
               preferences_uri: str, out_dir: str, seed: int, ctx: TrackingContext) -> StageResult:
    if cfg.algorithm == "ppo":
        return run_ppo(cfg.ppo, sft_model_uri=sft_model_uri, reward_model_uri=reward_model_uri,
                       prompts_uri=prompts_uri, out_dir=out_dir, seed=seed, ctx=ctx)
    raise ValueError(f"policy.algorithm {cfg.algorithm!r} is not supported")


policy_task = task(name="policy")(run_policy)
