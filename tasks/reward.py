"""Reward model: Bradley-Terry on preference pairs (TRL RewardTrainer), then calibrate and normalise.

1. Train a scalar head on the SFT model (``AutoModelForSequenceClassification``, num_labels=1)
   with -log sigmoid(r_c - r_r [- margin]) (models/reward.py: pairwise_loss).
2. On held-out pairs: accuracy, and a temperature T fitted so sigmoid((r_c - r_r) / T) matches
   the annotators' vote share (Guo et al. 2017, https://arxiv.org/abs/1706.04599); ECE before
   and after.
3. Score samples of the SFT policy on RL prompts: their mean/std standardise rewards in RL.

Outputs in ``out_dir``: RM weights (safetensors), tokenizer, ``reward_calibration.json``.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from typing import Any

from prefect import task
from pydantic import Field

from dataio import (DataError, content_hash, explicit_prompts, is_conversational, preference_rows,
                    read_records, render_prompt)
from tasks.base import LoraSettings, ModelResult, StageConfig, TrackingContext, peft_config
from tasks.durable import atomic_dir, checkpoint_dir, finite_loss_callback, last_complete_checkpoint
from tasks.launch import LaunchConfig, run_stage
from tasks.tracking import (log_metrics, log_model_dir, stage_run, trainer_args,
                            trainer_metrics_callback)


class RewardConfig(StageConfig):
    """Reward model training, calibration and score normalisation. Defaults: full fine-tuning
    of a ~0.5B SFT model on one GPU."""

    max_steps: int = 1000
    """Optimizer steps (each sees ``per_device_train_batch_size`` pairs)."""
    learning_rate: float = 1e-5
    """Peak AdamW learning rate (~1e-5 for full fine-tuning of billion-parameter models, ~1e-4
    with LoRA, ~5e-4 for tiny models like the demo's)."""
    per_device_train_batch_size: int = 16
    """Preference pairs per step (each pair is two sequences)."""
    max_length: int = 1024
    """Pairs whose chosen or rejected sequence is longer than this many tokens are dropped."""
    warmup_ratio: float = 0.05
    """Share of steps spent warming the learning rate up linearly from zero."""
    margin: bool = True
    """Subtract a margin 2p - 1 from r_c - r_r, p = chosen_votes / num_votes, when the data has
    vote counts (Llama 2, https://arxiv.org/abs/2307.09288, Eq. 2): clear wins must win by more."""
    center_rewards_coefficient: float | None = 0.01
    """Weight of mean((r_c + r_r)^2), keeping rewards near zero (https://arxiv.org/abs/2312.09244, Eq. 2)."""
    calibrate: bool = True
    """Fit a temperature on the held-out pairs; False keeps T = 1."""
    normalize_samples: int = 256
    """SFT-policy samples on RL prompts used to estimate the reward mean/std; 0 keeps (0, 1)."""
    max_new_tokens: int = 128
    """Tokens generated per normalisation sample (set it like the RL stage's response length)."""
    eval_batch_size: int = 32
    """Sequences per forward pass when scoring held-out pairs and samples."""
    lora: LoraSettings | None = None
    """Train LoRA adapters (plus the score head) instead of all weights; merged before saving."""
    logging_steps: int = 10
    """Log training metrics to MLflow every this many steps."""
    save_steps: int = Field(default=200, ge=0)
    """Checkpoint (weights, optimizer, scheduler, RNG) every this many steps, beside the
    stage's output folder; a re-run of a killed stage resumes from the newest. 0: none."""
    heldout_seed_offset: int | None = 1
    """Also train a held-out reward model with seed + this offset (another score-head
    initialisation and data order): the evaluation's judge when there is no gold judge, since
    the policy never optimised against it. Null: none (the policy's own reward model judges)."""


class RewardResult(ModelResult):
    """The reward model; ``model_uri`` also holds its calibration (``reward_calibration.json``)."""

    num_train_pairs: int
    heldout_model_uri: str | None = None
    """The held-out reward model (``heldout_seed_offset``), or None."""


def soft_label(record: dict[str, Any]) -> float:
    """Share of annotators who preferred ``chosen`` (1.0 when the data has no vote counts)."""
    if record.get("num_votes"):
        return record["chosen_votes"] / record["num_votes"]
    return 1.0


def sequence_ids(record: dict[str, Any], answer: str, tokenizer) -> list[int]:
    """Token ids of prompt + answer exactly as TRL's RewardTrainer builds them for training."""
    prompt, reply = record.get("prompt"), record[answer]
    if is_conversational(reply):
        messages = (prompt or []) + reply
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    text = (prompt or "") + reply
    if not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def score_id_lists(model, tokenizer, id_lists: list[list[int]], batch_size: int):
    """Raw scores (N,) for token-id lists, batched, padded on the tokenizer's side."""
    import torch

    from models.reward import score_sequences

    scores = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(id_lists), batch_size):
            batch = tokenizer.pad({"input_ids": id_lists[i:i + batch_size]}, return_tensors="pt")
            scores.append(score_sequences(model, batch["input_ids"], batch["attention_mask"]))
    return torch.cat(scores) if scores else torch.zeros(0)


def make_trainer_class():
    """RewardTrainer whose rewards come from ``score_sequences`` (import-time cost deferred).

    TRL pools the HF sequence-classification forward, which finds the last token by
    ``pad_token_id``; with pad == eos (common) that is the token *before* the final EOS, while
    our PPO stage scores with ``score_sequences`` (last attended token). Training through the
    same function keeps the two consistent. The loss and logged metrics follow TRL 1.16's
    ``RewardTrainer.compute_loss``.
    """
    import torch
    from accelerate.utils import is_peft_model
    from trl import RewardTrainer

    from models.reward import pairwise_loss, score_sequences, score_sequences_through

    class MaskPooledRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            if model is self.model:  # one process (or evaluation): the model itself
                scorer = model.get_base_model() if is_peft_model(model) else model
                rewards = score_sequences(scorer, inputs["input_ids"], inputs["attention_mask"])
            else:  # wrapped for data parallel training: its forward must run (see there)
                inner = self.model.get_base_model() if is_peft_model(self.model) else self.model
                rewards = score_sequences_through(model, inner, inputs["input_ids"],
                                                  inputs["attention_mask"])  # (2B,)
            r_chosen, r_rejected = torch.chunk(rewards, 2)  # (B,), (B,)
            loss = pairwise_loss(r_chosen, r_rejected, inputs.get("margin"))
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * ((r_chosen + r_rejected) ** 2).mean()
            with torch.no_grad():
                m = self._metrics[mode]
                m["accuracy"].append((r_chosen > r_rejected).float().mean().item())
                m["margin"].append((r_chosen - r_rejected).mean().item())
                m["mean_reward"].append(rewards.mean().item())
            return (loss, {"logits": rewards[:, None]}) if return_outputs else loss

    return MaskPooledRewardTrainer


def sample_policy_ids(sft_model_uri: str, tokenizer, prompts: list[Any], cfg: RewardConfig,
                      seed: int) -> list[list[int]]:
    """prompt + sampled completion ids (through the first EOS) from the SFT policy."""
    import torch
    import transformers

    from models.loading import load_causal_lm

    policy = load_causal_lm(sft_model_uri).eval()
    transformers.set_seed(seed)
    texts = [render_prompt(p, tokenizer) for p in prompts]
    out: list[list[int]] = []
    with torch.no_grad():
        for i in range(0, len(texts), cfg.eval_batch_size):
            # A chat template already writes BOS and friends; plain text gets them like in training.
            enc = tokenizer(texts[i:i + cfg.eval_batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=not is_conversational(prompts[0]))
            gen = policy.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                  max_new_tokens=cfg.max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id)
            prompt_len = enc["input_ids"].shape[1]
            for row, mask in zip(gen, enc["attention_mask"]):
                prompt_ids = row[:prompt_len][mask.bool()].tolist()
                completion = row[prompt_len:].tolist()
                if tokenizer.eos_token_id in completion:
                    completion = completion[:completion.index(tokenizer.eos_token_id) + 1]
                out.append(prompt_ids + completion)
    return out


def train_reward_model(cfg: RewardConfig, *, sft_model_uri: str, tokenizer, train, seed: int,
                       checkpoints: str, callback=None):
    """A Bradley-Terry reward model trained from the SFT weights (score head seeded by
    ``seed``); returns the model in eval mode (LoRA merged), the mean training loss, the steps
    done and the checkpoint it resumed from (``checkpoints`` holds them; None: a fresh start).
    Under ``accelerate launch`` every process trains and only the main one gets the model
    (the others get None)."""
    import transformers
    import trl

    from models.loading import load_sequence_scorer
    from tasks.distributed import refuse_sharded_lora, trained_model

    refuse_sharded_lora(cfg.lora)
    transformers.set_seed(seed)  # before loading: the score head is freshly initialised
    model = load_sequence_scorer(sft_model_uri)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = trainer_args(
        trl.RewardConfig, checkpoints, seed, save_steps=cfg.save_steps, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        max_length=min(cfg.max_length, tokenizer.model_max_length),
        warmup_steps=cfg.warmup_ratio,  # float < 1: a ratio
        center_rewards_coefficient=cfg.center_rewards_coefficient,
        logging_steps=cfg.logging_steps,
    )
    trainer = make_trainer_class()(
        model=model, args=args, train_dataset=train, processing_class=tokenizer,
        callbacks=[finite_loss_callback("reward")] + ([callback] if callback else []),
        peft_config=peft_config(cfg.lora, "SEQ_CLS", modules_to_save=["score"]))
    resume = last_complete_checkpoint(checkpoints)
    train_out = trainer.train(resume_from_checkpoint=resume)
    steps = trainer.state.global_step
    model = trained_model(trainer, f"{checkpoints}/gathered", load_sequence_scorer)
    if model is None:  # not the main process: it only helped train
        return None, train_out.training_loss, steps, resume
    if cfg.lora is not None:
        model = model.merge_and_unload()
    return model.eval(), train_out.training_loss, steps, resume


def run_reward(cfg: RewardConfig, *, sft_model_uri: str, train_uri: str, eval_uri: str,
               rl_prompts_uri: str, out_dir: str, seed: int,
               ctx: TrackingContext) -> RewardResult | None:
    """Train, calibrate and normalise a reward model from the SFT checkpoint at ``sft_model_uri``
    (and a held-out one from another seed, saved beside it as ``<out_dir>-heldout``).

    Under ``accelerate launch`` every process trains both models (the trainer splits the
    batches); the main one then calibrates, normalises, saves and logs, the others return None."""
    import datasets
    import mlflow
    import torch

    from models.diagnostics import longer_preferred
    from models.loading import load_tokenizer
    from models.reward import (RewardNorm, expected_calibration_error, fit_temperature,
                               preference_accuracy, preference_nll)
    from tasks.distributed import is_main_process

    main = is_main_process()
    with stage_run(ctx, "reward", cfg, seed) if main else contextlib.nullcontext() as run:
        for name, uri in (("preferences", train_uri), ("eval_pairs", eval_uri),
                          ("rl_prompts", rl_prompts_uri)):
            if main:
                mlflow.set_tag(f"data.{name}.sha256", content_hash(uri))
        tokenizer = load_tokenizer(sft_model_uri)
        train = datasets.Dataset.from_list(preference_rows(read_records(train_uri), train_uri,
                                                           cfg.margin))
        heldout_dir = f"{out_dir}-heldout" if cfg.heldout_seed_offset is not None else None
        model, train_loss, steps, resumed = train_reward_model(
            cfg, sft_model_uri=sft_model_uri, tokenizer=tokenizer, train=train, seed=seed,
            checkpoints=checkpoint_dir(out_dir),
            callback=trainer_metrics_callback("reward", run.info.run_id) if main else None)
        heldout = None
        if heldout_dir is not None:  # trained here: training needs every process
            heldout, heldout_loss, _, _ = train_reward_model(
                cfg, sft_model_uri=sft_model_uri, tokenizer=tokenizer, train=train,
                seed=seed + cfg.heldout_seed_offset, checkpoints=checkpoint_dir(heldout_dir))
        if not main:
            return None
        if resumed:  # an earlier run of this very stage (same folder key) was killed
            mlflow.set_tag("rlhf.resumed_from", resumed)

        # Held-out pairs: accuracy and calibration (an implicit prompt split off as in training).
        max_length = min(cfg.max_length, tokenizer.model_max_length)
        eval_records = explicit_prompts(read_records(eval_uri), eval_uri)
        chosen = [sequence_ids(r, "chosen", tokenizer) for r in eval_records]
        rejected = [sequence_ids(r, "rejected", tokenizer) for r in eval_records]
        keep = [i for i in range(len(eval_records))
                if len(chosen[i]) <= max_length and len(rejected[i]) <= max_length]
        if not keep:
            raise DataError(eval_uri, f"no pair fits max_length={max_length}",
                            rule="max_total_tokens")
        chosen, rejected = [chosen[i] for i in keep], [rejected[i] for i in keep]
        # Pairs share their prompt, so sequence lengths compare the two responses.
        len_c, len_r = (torch.tensor([len(ids) for ids in x]) for x in (chosen, rejected))
        r_c = score_id_lists(model, tokenizer, chosen, cfg.eval_batch_size)
        r_r = score_id_lists(model, tokenizer, rejected, cfg.eval_batch_size)
        labels = torch.tensor([soft_label(eval_records[i]) for i in keep], dtype=r_c.dtype)
        diffs = r_c - r_r  # (N,)
        temperature = fit_temperature(diffs, labels) if cfg.calibrate else 1.0
        metrics = {
            "reward/train_loss": train_loss,
            "reward/steps": float(steps),
            "reward/eval_accuracy": preference_accuracy(r_c, r_r),
            "reward/eval_pairs": float(len(keep)),
            "reward/temperature": temperature,
            "reward/ece_before": expected_calibration_error(torch.sigmoid(diffs), labels),
            "reward/ece_after": expected_calibration_error(torch.sigmoid(diffs / temperature), labels),
            "reward/eval_nll_before": preference_nll(diffs, labels),
            "reward/eval_nll": preference_nll(diffs, labels, temperature),
            # What the reward rewards: does it prefer the longer response of a held-out pair?
            "reward/longer_preferred": longer_preferred(r_c, r_r, len_c, len_r),
            "reward/labels_longer_chosen": longer_preferred(labels, 1 - labels, len_c, len_r),
        }

        # Normalisation statistics on what the RL stage will score first: SFT samples.
        mean, std = 0.0, 1.0
        if cfg.normalize_samples > 0:
            prompts = [r["prompt"] for r in read_records(rl_prompts_uri)]
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
            prompts = [prompts[i] for i in order[:cfg.normalize_samples].tolist()]
            samples = sample_policy_ids(sft_model_uri, tokenizer, prompts, cfg, seed)
            scores = score_id_lists(model, tokenizer, samples, cfg.eval_batch_size)
            mean = scores.mean().item()
            std = scores.std().item() if len(scores) > 1 else 1.0
            std = std if math.isfinite(std) and std > 0 else 1.0
        metrics.update({"reward/sample_mean": mean, "reward/sample_std": std})

        with atomic_dir(out_dir) as tmp:  # disk full: no half-written reward model to use
            model.save_pretrained(tmp)  # safetensors by default
            tokenizer.save_pretrained(tmp)
            RewardNorm(temperature=temperature, mean=mean, std=std).save(
                tmp, extra={"eval_accuracy": metrics["reward/eval_accuracy"],
                            "ece_before": metrics["reward/ece_before"],
                            "ece_after": metrics["reward/ece_after"],
                            "eval_nll": metrics["reward/eval_nll"],
                            "normalize_samples": cfg.normalize_samples})
        if heldout is not None:
            h_c = score_id_lists(heldout, tokenizer, chosen, cfg.eval_batch_size)
            h_r = score_id_lists(heldout, tokenizer, rejected, cfg.eval_batch_size)
            metrics.update({"reward/heldout/train_loss": heldout_loss,
                            "reward/heldout/eval_accuracy": preference_accuracy(h_c, h_r),
                            "reward/heldout/longer_preferred": longer_preferred(h_c, h_r, len_c,
                                                                                len_r)})
            with atomic_dir(heldout_dir) as tmp:
                heldout.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        # Both models are whole now; until here a re-run resumes from their checkpoints.
        for d in (out_dir, heldout_dir):
            if d is not None:
                shutil.rmtree(checkpoint_dir(d), ignore_errors=True)
        log_metrics(metrics, step=cfg.max_steps)
        log_model_dir(out_dir, "model")
        return RewardResult(stage="reward", run_id=run.info.run_id, model_uri=out_dir,
                            metrics=metrics, num_train_pairs=len(train),
                            heldout_model_uri=heldout_dir)


@task(name="reward")
def reward_task(cfg: RewardConfig, *, launch: LaunchConfig | None = None,
                **inputs) -> RewardResult:
    """``run_reward`` here, or in ``launch.num_processes`` processes (``tasks/launch.py``)."""
    return run_stage(launch, "reward", cfg=cfg, **inputs)
