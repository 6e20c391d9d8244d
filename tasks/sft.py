"""Supervised fine-tuning: teach the base model the task's format from demonstrations (TRL SFTTrainer).

Data: TRL's prompt/completion format (standard or conversational), conversational ``messages``
or plain ``text`` (https://huggingface.co/docs/trl/dataset_formats), from JSONL, Parquet or a
``datasets`` directory. Columns TRL does not know are dropped. The loss is on completion tokens
only by default; TRL appends EOS to every completion, so the policy learns where to stop.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from dataio import DataError, content_hash, openable, read_records
from tasks.base import (BaseModelConfig, LoraSettings, ModelResult, StageConfig, TrackingContext,
                        peft_config)
from tasks.durable import atomic_dir, checkpoint_dir, finite_loss_callback, last_complete_checkpoint
from tasks.launch import LaunchConfig, run_stage
from tasks.tracking import (log_metrics, log_model_dir, stage_run, trainer_args,
                            trainer_metrics_callback)


class SFTConfig(StageConfig):
    """Supervised fine-tuning. Defaults: full fine-tuning of a ~0.5B hub model on one GPU
    (TRL's SFT defaults; 32 examples of up to 1,024 tokens per step)."""

    max_steps: int = 1000
    """Optimizer steps (each step sees batch size x gradient accumulation examples)."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate (TRL's default: ~1e-5 to 2e-5 for full fine-tuning of
    billion-parameter models, ~1e-4 with LoRA, ~1e-3 for tiny models like the demo's)."""
    per_device_train_batch_size: int = 8
    """Examples per forward pass."""
    gradient_accumulation_steps: int = 4
    """Forward passes accumulated per optimizer step."""
    max_length: int = 1024
    """Tokens per example; longer examples are truncated (the model's own limit applies too)."""
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Share of steps spent warming the learning rate up linearly from zero."""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name after warmup (``cosine``, ``linear``, ``constant``, ...)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    completion_only_loss: bool = True
    """Loss on completion tokens only (prompt/completion data); False trains on the prompt too."""
    eval_fraction: float = 0.05
    """Share of examples held out to report ``sft/eval_loss``; 0 disables it."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights; adapters are merged before saving."""
    logging_steps: int = 10
    """Log training metrics to MLflow every this many steps."""
    save_steps: int = Field(default=200, ge=0)
    """Checkpoint (weights, optimizer, scheduler, RNG) every this many steps, beside the
    stage's output folder; a re-run of a killed stage resumes from the newest. 0: none."""


HELDOUT_FILE = "heldout.jsonl"


class SFTResult(ModelResult):
    num_train_examples: int
    heldout_uri: str | None = None
    """The demonstrations held out of training (``eval_fraction``), as JSONL: the evaluation
    measures the policy's perplexity on them (does RL cost the model what SFT taught it?)."""


def sft_rows(records: list[dict[str, Any]], uri: str) -> list[dict[str, Any]]:
    """Keep the columns TRL's SFTTrainer reads, for whichever standard format the data is in."""
    if not records:
        raise DataError(uri, "no rows", rule="min_rows")
    first = records[0]
    for columns in (("messages",), ("prompt", "completion"), ("text",)):
        if all(c in first for c in columns):
            return [{c: r[c] for c in columns} for r in records]
    raise DataError(uri, f"expected prompt/completion, messages or text columns, got "
                         f"{sorted(first)}", rule="required_columns", row=1)


def run_sft(cfg: SFTConfig, *, base_model: BaseModelConfig, data_uri: str, out_dir: str,
            seed: int, ctx: TrackingContext) -> SFTResult | None:
    """Fine-tune ``base_model`` on ``data_uri``; save weights + tokenizer to ``out_dir``.

    Under ``accelerate launch`` every process trains (the trainer splits the batches); the
    main one logs, saves and returns the result, the others return None."""
    import datasets
    import mlflow
    import transformers
    import trl

    from models.loading import load_causal_lm, load_tokenizer
    from tasks.distributed import is_main_process, refuse_sharded_lora, trained_model

    refuse_sharded_lora(cfg.lora)
    main = is_main_process()
    with stage_run(ctx, "sft", cfg, seed) if main else contextlib.nullcontext() as run:
        if main:
            mlflow.set_tag("data.sft.sha256", content_hash(data_uri))
        transformers.set_seed(seed)
        rows = sft_rows(read_records(data_uri), data_uri)
        data = datasets.Dataset.from_list(rows)
        eval_data = None
        if cfg.eval_fraction > 0 and len(data) >= 20:
            split = data.train_test_split(test_size=cfg.eval_fraction, seed=seed)
            data, eval_data = split["train"], split["test"]

        base = openable(base_model.path)  # an s3:// base model: its cached local copy
        tokenizer = load_tokenizer(base, base_model.revision, base_model.trust_remote_code,
                                   chat_template=base_model.chat_template)
        model = load_causal_lm(base, base_model.revision, base_model.trust_remote_code)
        max_length = min(cfg.max_length, tokenizer.model_max_length)
        callbacks = [trainer_metrics_callback("sft", run.info.run_id)] if main else []
        checkpoints = checkpoint_dir(out_dir)
        args = trainer_args(
            trl.SFTConfig, checkpoints, seed, save_steps=cfg.save_steps, max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            per_device_eval_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            # transformers 5 removed warmup_ratio: a float < 1 in warmup_steps is the ratio.
            max_length=max_length, warmup_steps=cfg.warmup_ratio,
            lr_scheduler_type=cfg.lr_scheduler_type, weight_decay=cfg.weight_decay,
            completion_only_loss=cfg.completion_only_loss, logging_steps=cfg.logging_steps,
            trust_remote_code=base_model.trust_remote_code,
        )
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data,
                                 eval_dataset=eval_data, processing_class=tokenizer,
                                 callbacks=callbacks + [finite_loss_callback("sft")],
                                 peft_config=peft_config(cfg.lora, "CAUSAL_LM"))
        resume = last_complete_checkpoint(checkpoints)
        if resume and main:  # an earlier run of this very stage (same folder key) was killed
            mlflow.set_tag("rlhf.resumed_from", resume)
        train_out = trainer.train(resume_from_checkpoint=resume)
        metrics = {"sft/train_loss": train_out.training_loss,
                   "sft/train_runtime_s": train_out.metrics.get("train_runtime", 0.0),
                   "sft/steps": float(trainer.state.global_step)}
        if callbacks and "sft/loss" in callbacks[0].last:
            metrics["sft/final_loss"] = callbacks[0].last["sft/loss"]
        if eval_data is not None:  # every process: the trainer splits and gathers it
            metrics["sft/eval_loss"] = trainer.evaluate()["eval_loss"]
        model = trained_model(trainer, f"{checkpoints}/gathered", load_causal_lm)
        if not main:
            return None

        if cfg.lora is not None:
            model = model.merge_and_unload()
        heldout_uri = None
        with atomic_dir(out_dir) as tmp:  # disk full: no half-written model for later stages
            model.save_pretrained(tmp)  # safetensors by default
            tokenizer.save_pretrained(tmp)
            if eval_data is not None:
                eval_data.to_json(str(tmp / HELDOUT_FILE), lines=True, force_ascii=False)
                heldout_uri = str(Path(out_dir) / HELDOUT_FILE)
        shutil.rmtree(checkpoints, ignore_errors=True)  # the stage's output is whole now
        log_metrics(metrics, step=cfg.max_steps)
        log_model_dir(out_dir, "model")
        return SFTResult(stage="sft", run_id=run.info.run_id, model_uri=out_dir,
                         metrics=metrics, num_train_examples=len(data), heldout_uri=heldout_uri)


@task(name="sft")
def sft_task(cfg: SFTConfig, *, launch: LaunchConfig | None = None, **inputs) -> SFTResult:
    """``run_sft`` here, or in ``launch.num_processes`` processes (``tasks/launch.py``)."""
    return run_stage(launch, "sft", cfg=cfg, **inputs)
