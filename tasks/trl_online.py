"""GRPO and RLOO stages: TRL's online trainers with our reward model as the reward function.

Both sample ``num_generations`` completions per prompt from the policy, score each one with
the reward stage's model (normalised like PPO's rewards) and use the group as the baseline
instead of a critic. They differ in where the KL to the frozen SFT policy goes:

- GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300, Eq. 3): group-normalised
  advantages; KL as a per-token loss term, k3 estimator, ``beta * KL``.
- RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): leave-one-out baseline;
  KL as a sequence-level penalty inside the reward, k1 estimator, like our PPO.

Also here, shared with ``tasks/dpo.py``: the TRL-to-PPO metric names.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.base import LoraSettings, PolicyResult, StageConfig, TrackingContext, peft_config
from tasks.distributed import is_main_process
from tasks.tracking import save_policy, stage_run, trainer_args, trainer_metrics_callback

# TRL metric names -> the names PPO logs (tasks/ppo.py), so dashboards compare like with like.
# Both TRL "kl" metrics are per-token means (GRPO: k3, RLOO: k1); PPO's objective/kl is per sequence.
TRL_TO_PPO_NAMES = {"kl": "objective/kl", "reward": "objective/scores"}


class OnlineRLSettings(StageConfig):
    """What GRPO and RLOO share. Defaults: a ~0.5B SFT model on one GPU (TRL's learning rate,
    groups of 8, 256-token completions)."""

    max_steps: int = 500
    """Optimizer steps. Episodes sampled = max_steps * per_device_train_batch_size / num_iterations."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate (~1e-6 for billion-parameter models; tiny models like ~3e-4)."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name; linear decay to 0 like PPO's default."""
    per_device_train_batch_size: int = 16
    """Completions per optimizer step (a multiple of num_generations is simplest)."""
    steps_per_generation: int = 4
    """Optimizer steps per sampled batch: each generation samples
    per_device_train_batch_size * steps_per_generation completions."""
    num_generations: int = 8
    """Completions sampled per prompt: the group whose other members form the baseline."""
    num_iterations: int = 1
    """Passes over each sampled batch (mu in the GRPO paper); >1 makes the ratio clip matter."""
    epsilon: float = 0.2
    """Ratio clip epsilon, as PPO's clip_range."""
    beta: float = Field(default=0.05, gt=0.0)
    """KL coefficient to the frozen SFT policy (> 0: without the KL term nothing anchors the policy)."""
    max_completion_length: int = 256
    """Completion length cap, as ``ppo.max_new_tokens`` for a fair comparison."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped (TRL 1.16 no longer truncates them)."""
    temperature: float = 1.0
    """Sampling temperature (no top-k / top-p, like PPO)."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of completions cut off without EOS, as in PPO; null = none."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights; merged before saving."""
    logging_steps: int = 10
    """Log training metrics to MLflow every this many optimizer steps."""


class GRPOSettings(OnlineRLSettings):
    """GRPO (https://arxiv.org/abs/2402.03300) through TRL's GRPOTrainer."""

    beta: float = Field(default=0.05, gt=0.0)
    """KL coefficient; the k3 per-token KL to the SFT policy is added to the loss."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """Token aggregation: ``dapo`` (TRL's default, no length bias) or ``grpo`` (per-sequence mean)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's std (GRPO), the batch's, or not at all (Dr. GRPO)."""


class RLOOSettings(OnlineRLSettings):
    """RLOO (https://arxiv.org/abs/2402.14740) through TRL's RLOOTrainer."""

    beta: float = Field(default=0.05, gt=0.0)
    """KL coefficient; beta * (summed k1 KL to the SFT policy) is subtracted from each reward,
    as in PPO's per-token penalty (``ppo.init_kl_coef``)."""
    normalize_advantages: bool = True
    """Standardise advantages over each sampled batch (mean 0, std 1), as PPO does."""


# --- reward function ---------------------------------------------------------------------------


class RewardModelScore:
    """TRL reward function: our reward model's normalised score of prompt + completion.

    TRL would accept the model object itself, but it would re-tokenize decoded text and pool by
    ``pad_token_id``; scoring the sampled ids with ``score_sequences`` (last attended token)
    keeps the rewards identical to what PPO and the reward stage compute.
    """

    def __init__(self, reward_model, reward_norm, tokenizer, missing_eos_penalty: float | None):
        self.model, self.norm, self.tokenizer = reward_model, reward_norm, tokenizer
        self.missing_eos_penalty = missing_eos_penalty
        self.device = next(reward_model.parameters()).device

    def __call__(self, prompts: list[str], completions: list[str],
                 completion_ids: list[list[int]], **kwargs) -> list[float]:
        import torch

        from models.reward import score_sequences
        from models.rollout import pad_sequences

        # The same call GRPOTrainer/RLOOTrainer._tokenize_prompts makes for text prompts.
        prompt_ids = self.tokenizer(text=list(prompts))["input_ids"]
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        ids, mask = pad_sequences(seqs, self.tokenizer.pad_token_id, left=False)  # (B, T)
        with torch.no_grad():
            raw = score_sequences(self.model, ids.to(self.device), mask.to(self.device))  # (B,)
        scores = self.norm.normalize(raw.float().cpu())
        if self.missing_eos_penalty is not None:
            eos = self.tokenizer.eos_token_id
            ended = torch.tensor([bool(c) and c[-1] == eos for c in completion_ids])  # (B,)
            scores = scores - self.missing_eos_penalty * (~ended).float()
        return scores.tolist()


def prompt_rows(uri: str, tokenizer, max_prompt_length: int) -> tuple[list[dict[str, str]], int]:
    """Prompt-only rows rendered to text (chat template applied), too-long ones dropped."""
    from dataio import DataError, read_records, render_prompt

    rows, dropped = [], 0
    for r in read_records(uri):
        text = render_prompt(r["prompt"], tokenizer)
        if len(tokenizer(text=text)["input_ids"]) > max_prompt_length:
            dropped += 1
        else:
            rows.append({"prompt": text})
    if not rows:
        raise DataError(uri, f"no prompt of at most {max_prompt_length} tokens",
                        rule="max_prompt_tokens")
    return rows, dropped


# --- the stage ---------------------------------------------------------------------------------


def run_online(algorithm: Literal["grpo", "rloo"], cfg: GRPOSettings | RLOOSettings, *,
               sft_model_uri: str, reward_model_uri: str, prompts_uri: str, out_dir: str,
               seed: int, ctx: TrackingContext) -> PolicyResult | None:
    """Train the SFT policy with GRPO or RLOO against the reward model; save and log it."""
    import datasets
    import mlflow
    import torch
    import transformers
    import trl

    from dataio import content_hash
    from models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(seed)
    # The GPU of this process under accelerate launch (LOCAL_RANK), the first one otherwise.
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() else torch.device("cpu"))
    tokenizer = load_tokenizer(sft_model_uri)
    policy = load_causal_lm(sft_model_uri)
    reward_model = load_sequence_scorer(reward_model_uri).to(device).eval().requires_grad_(False)
    for m in (policy, reward_model):
        m.config.pad_token_id = tokenizer.pad_token_id
    reward_fn = RewardModelScore(reward_model, RewardNorm.load(reward_model_uri), tokenizer,
                                 cfg.missing_eos_penalty)
    rows, dropped = prompt_rows(prompts_uri, tokenizer, cfg.max_prompt_length)

    # Under accelerate launch every process trains; the main one saves and logs.
    main = is_main_process()
    with (stage_run(ctx, "policy", cfg, seed, algorithm=algorithm) if main
          else contextlib.nullcontext()) as run:
        if main:
            mlflow.set_tag("data.rl_prompts.sha256", content_hash(prompts_uri))
            mlflow.log_metrics({f"{algorithm}/data/prompts": len(rows),
                                f"{algorithm}/data/prompts_dropped": dropped})
        common = dict(
            max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler_type, max_grad_norm=cfg.max_grad_norm,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            steps_per_generation=cfg.steps_per_generation, num_generations=cfg.num_generations,
            num_iterations=cfg.num_iterations, epsilon=cfg.epsilon, beta=cfg.beta,
            max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
            top_k=0, top_p=1.0, logging_steps=cfg.logging_steps)
        if algorithm == "grpo":
            config_cls, trainer_cls = trl.GRPOConfig, trl.GRPOTrainer
            common.update(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards)
        else:
            config_cls, trainer_cls = trl.RLOOConfig, trl.RLOOTrainer
            common.update(normalize_advantages=cfg.normalize_advantages)
        callbacks = ([trainer_metrics_callback(algorithm, run.info.run_id, TRL_TO_PPO_NAMES)]
                     if main else [])
        with tempfile.TemporaryDirectory() as scratch:
            trainer = trainer_cls(
                model=policy, reward_funcs=reward_fn,
                args=trainer_args(config_cls, scratch, seed, **common),
                train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                callbacks=callbacks, peft_config=peft_config(cfg.lora, "CAUSAL_LM"))
            trainer.train()
        if not main:
            return None
        policy_dir = save_policy(trainer.model, tokenizer, out,
                                 {"sft_model": sft_model_uri, "reward_model": reward_model_uri,
                                  "algorithm": algorithm}, merge_lora=cfg.lora is not None)
        last = callbacks[0].last
        metrics = {f"{algorithm}/steps": float(trainer.state.global_step),
                   f"{algorithm}/final_kl": last.get(f"{algorithm}/objective/kl", float("nan")),
                   f"{algorithm}/final_score": last.get(f"{algorithm}/objective/scores",
                                                        float("nan"))}
        mlflow.log_metrics(metrics)
        return PolicyResult(stage="policy", run_id=run.info.run_id, model_uri=str(policy_dir),
                            metrics=metrics, algorithm=algorithm,
                            steps=trainer.state.global_step, planned_steps=cfg.max_steps)
