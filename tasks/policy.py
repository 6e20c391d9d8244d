"""Policy-optimisation stage: chooses the algorithm (``policy.algorithm``) and runs it.

Every algorithm starts from the SFT model and returns the same ``PolicyResult`` (a saved policy
directory ``out_dir/policy`` logged as artifact "model" on the child run ``policy``, tagged
``rlhf.algorithm``), so the evaluate and gate stages do not care which one ran:

- ``ppo``: ours (tasks/ppo.py), reward model + critic + per-token KL penalty.
- ``dpo``: TRL DPOTrainer on the preference pairs; no reward model (tasks/dpo.py).
- ``grpo`` / ``rloo``: TRL's critic-free online trainers, our reward model as the reward
  function, KL to the SFT policy (tasks/trl_online.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from prefect import task

from tasks.base import PolicyResult, StageConfig, TrackingContext
from tasks.dpo import DPOSettings, run_dpo
from tasks.launch import LaunchConfig, run_stage
from tasks.ppo import PPOConfig, run_ppo
from tasks.trl_online import GRPOSettings, RLOOSettings, run_online


class PolicyConfig(StageConfig):
    """Which policy optimiser runs, and its settings (only the chosen one's are used)."""

    algorithm: Literal["ppo", "dpo", "grpo", "rloo"] = "ppo"
    """Policy optimiser: ``ppo`` (ours, KL-penalised), ``dpo`` (preference pairs, no reward
    model), ``grpo`` or ``rloo`` (TRL, group baseline, our reward model, KL to SFT)."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """Settings for ``algorithm: ppo``."""
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    """Settings for ``algorithm: dpo``."""
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    """Settings for ``algorithm: grpo``."""
    rloo: RLOOSettings = Field(default_factory=RLOOSettings)
    """Settings for ``algorithm: rloo``."""

    def key_dump(self) -> dict:
        """Only the chosen algorithm's settings: editing DPO's must neither re-run a finished
        PPO stage nor orphan an interrupted one's checkpoint."""
        return {"algorithm": self.algorithm,
                self.algorithm: getattr(self, self.algorithm).model_dump(mode="json")}


def run_policy(cfg: PolicyConfig, *, sft_model_uri: str, reward_model_uri: str, prompts_uri: str,
               preferences_uri: str, out_dir: str, seed: int,
               ctx: TrackingContext) -> PolicyResult | None:
    """Run ``cfg.algorithm`` from the SFT model; the child run and stage are named after it.
    Under ``accelerate launch`` the main process returns the result, the others None."""
    if cfg.algorithm == "ppo":
        return run_ppo(cfg.ppo, sft_model_uri=sft_model_uri, reward_model_uri=reward_model_uri,
                       prompts_uri=prompts_uri, out_dir=out_dir, seed=seed, ctx=ctx)
    if cfg.algorithm == "dpo":
        return run_dpo(cfg.dpo, sft_model_uri=sft_model_uri, preferences_uri=preferences_uri,
                       out_dir=out_dir, seed=seed, ctx=ctx)
    if cfg.algorithm in ("grpo", "rloo"):
        return run_online(cfg.algorithm, getattr(cfg, cfg.algorithm), sft_model_uri=sft_model_uri,
                          reward_model_uri=reward_model_uri, prompts_uri=prompts_uri,
                          out_dir=out_dir, seed=seed, ctx=ctx)
    raise ValueError(f"policy.algorithm {cfg.algorithm!r} is not supported")


@task(name="policy")
def policy_task(cfg: PolicyConfig, *, launch: LaunchConfig | None = None,
                **inputs) -> PolicyResult:
    """``run_policy`` here, or in ``launch.num_processes`` processes (``tasks/launch.py``)."""
    return run_stage(launch, "policy", cfg=cfg, **inputs)
