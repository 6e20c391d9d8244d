"""DPO stage: optimise the policy directly on the preference pairs (TRL DPOTrainer).

Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7):
-log sigmoid(beta * [log pi/pi_ref (chosen) - log pi/pi_ref (rejected)]), with pi_ref the frozen
SFT policy. No reward model and no sampling: beta plays the role of PPO's KL coefficient
(the implicit reward is beta * log pi/pi_ref). The reward model is not used here; the evaluate
stage still scores the result with it and with the gold judge.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.base import LoraSettings, PolicyResult, StageConfig, TrackingContext, peft_config
from tasks.distributed import is_main_process
from tasks.tracking import save_policy, stage_run, trainer_args, trainer_metrics_callback


class DPOSettings(StageConfig):
    """DPO hyper-parameters. Defaults: a ~0.5B SFT model on one GPU, the DPO paper's beta and
    TRL's learning rate (configs/demo.yaml shows what a tiny model wants instead)."""

    max_steps: int = 1000
    """Optimizer steps (each sees ``per_device_train_batch_size`` pairs)."""
    learning_rate: float = 1e-6
    """Peak AdamW learning rate (~5e-7 to 1e-6 for billion-parameter models; tiny models ~1e-4)."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name after warmup."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of steps spent warming the learning rate up linearly from zero."""
    per_device_train_batch_size: int = 16
    """Preference pairs per optimizer step."""
    beta: float = Field(default=0.1, gt=0.0)
    """Strength of the implicit KL to the SFT policy: higher stays closer (paper: 0.1 to 0.5)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """``sigmoid`` is DPO; ``ipo`` (https://arxiv.org/abs/2310.12036) does not push the margin
    to infinity on deterministic preferences; ``robust`` expects label noise."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Assumed share of flipped labels, used by ``robust`` only; 0 = trust the labels."""
    max_length: int = 1024
    """Prompt + answer tokens; longer pairs are truncated at the end (the model's limit applies too)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights (the reference is then the adapter-free
    model); merged before saving."""
    logging_steps: int = 10
    """Log training metrics to MLflow every this many optimizer steps."""


def run_dpo(cfg: DPOSettings, *, sft_model_uri: str, preferences_uri: str, out_dir: str,
            seed: int, ctx: TrackingContext) -> PolicyResult | None:
    """Train the SFT policy with DPO on ``preferences_uri``; save and log it like PPO."""
    import datasets
    import mlflow
    import transformers
    import trl

    from dataio import content_hash, preference_rows, read_records
    from models.loading import load_causal_lm, load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(seed)
    tokenizer = load_tokenizer(sft_model_uri)
    policy = load_causal_lm(sft_model_uri)
    # An explicit frozen reference: TRL would otherwise reload it from config._name_or_path.
    ref_policy = None if cfg.lora is not None else load_causal_lm(sft_model_uri)
    for m in (policy, ref_policy):
        if m is not None:
            m.config.pad_token_id = tokenizer.pad_token_id
    # prompt/chosen/rejected only (vote counts and ids are dropped); an implicit prompt is split
    # off here, as DPOTrainer would, so validation and every stage see the same pairs.
    rows = preference_rows(read_records(preferences_uri), preferences_uri, with_margin=False)

    # Under accelerate launch every process trains; the main one saves and logs.
    main = is_main_process()
    with (stage_run(ctx, "policy", cfg, seed, algorithm="dpo") if main
          else contextlib.nullcontext()) as run:
        if main:
            mlflow.set_tag("data.preferences.sha256", content_hash(preferences_uri))
        callbacks = [trainer_metrics_callback("dpo", run.info.run_id)] if main else []
        with tempfile.TemporaryDirectory() as scratch:
            args = trainer_args(
                trl.DPOConfig, scratch, seed, max_steps=cfg.max_steps,
                learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
                # transformers 5 removed warmup_ratio: a float < 1 in warmup_steps is the ratio.
                warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm,
                per_device_train_batch_size=cfg.per_device_train_batch_size, beta=cfg.beta,
                loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing,
                max_length=min(cfg.max_length, tokenizer.model_max_length),
                logging_steps=cfg.logging_steps)
            trainer = trl.DPOTrainer(model=policy, ref_model=ref_policy, args=args,
                                     train_dataset=datasets.Dataset.from_list(rows),
                                     processing_class=tokenizer, callbacks=callbacks,
                                     peft_config=peft_config(cfg.lora, "CAUSAL_LM"))
            train_out = trainer.train()
        if not main:
            return None
        policy_dir = save_policy(trainer.model, tokenizer, out,
                                 {"sft_model": sft_model_uri, "preferences": preferences_uri,
                                  "algorithm": "dpo"}, merge_lora=cfg.lora is not None)
        last = callbacks[0].last
        metrics = {"dpo/steps": float(trainer.state.global_step),
                   "dpo/train_loss": train_out.training_loss,
                   "dpo/final_accuracy": last.get("dpo/rewards/accuracies", float("nan")),
                   "dpo/final_margin": last.get("dpo/rewards/margins", float("nan"))}
        mlflow.log_metrics(metrics)
        return PolicyResult(stage="policy", run_id=run.info.run_id, model_uri=str(policy_dir),
                            metrics=metrics, algorithm="dpo", steps=trainer.state.global_step,
                            planned_steps=cfg.max_steps)
