"""Benchmark worker: trl 1.12's ``trl.experimental.ppo.PPOTrainer`` on the matched settings.

    bench/.venv-trl112/bin/python bench/trl112_ppo_worker.py SETTINGS.json RESULT.json

Runs in its own venv (trl 1.12 is a peer to compare with, never a dependency: trl 1.16 has
no PPOTrainer, removed in TRL PR #7020). Imports nothing from this repo but
``ppo_bench_common``; times ``trainer.train()`` only (model loading and trainer set-up
excluded). Settings that differ from trl's defaults, and why, are commented below.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ppo_bench_common as common  # noqa: E402


def load_prompt_ids(path: str, tokenizer, max_len: int) -> list[list[int]]:
    """Same tokenisation as our ``tasks.ppo._load_prompts`` for plain-text prompts."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    ids = [tokenizer(str(r["prompt"]), add_special_tokens=False)["input_ids"][-max_len:]
           for r in rows]
    return [p for p in ids if p]


def main(settings_path: str, result_path: str) -> None:
    s = common.read_settings(settings_path)
    torch, device = common.setup_torch(s)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    tok = AutoTokenizer.from_pretrained(s["policy_dir"])
    tok.padding_side = "left"  # PPOTrainer generates from left-padded queries
    policy = AutoModelForCausalLM.from_pretrained(s["policy_dir"])
    ref = AutoModelForCausalLM.from_pretrained(s["policy_dir"])
    rm = AutoModelForSequenceClassification.from_pretrained(s["rm_dir"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(s["rm_dir"], num_labels=1)
    for m in (policy, ref, rm, value):
        m.config.pad_token_id = tok.pad_token_id
    train = Dataset.from_dict({"input_ids": load_prompt_ids(s["prompts_path"], tok,
                                                            s["max_prompt_length"])})
    tmp = tempfile.mkdtemp(prefix="trl112_ppo_")
    args = PPOConfig(
        output_dir=tmp, seed=s["seed"], report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=device.type == "cpu", dataloader_num_workers=0,
        # batch 64 = per_device_train_batch_size * gradient_accumulation_steps (1 process);
        # num_mini_batches=4 -> 4 optimiser steps of 16 episodes per PPO epoch, as ours.
        per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
        num_mini_batches=s["mini_batches"], num_ppo_epochs=s["ppo_epochs"],
        local_rollout_forward_batch_size=s["batch_size"], total_episodes=s["total_episodes"],
        response_length=s["response_length"], temperature=s["temperature"], stop_token="eos",
        missing_eos_penalty=s["missing_eos_penalty"], kl_coef=s["kl_coef"], kl_estimator="k1",
        cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"],
        gamma=s["gamma"], lam=s["lam"], whiten_rewards=False,
        learning_rate=s["learning_rate"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, adam_epsilon=1e-5,  # ours uses AdamW eps 1e-5 (CleanRL detail)
        # trl's PPOConfig defaults bf16=True and gradient_checkpointing=True; ours runs fp32
        # on CPU without checkpointing, so both are off to compare the same arithmetic.
        # Settings with mixed_precision "bf16" (GPU runs) turn trl's bf16 back on, matching ours.
        bf16=s.get("mixed_precision", "no") == "bf16", fp16=False, gradient_checkpointing=False,
        num_sample_generations=0,  # no periodic sample tables (ours has none either)
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=rm, value_model=value, train_dataset=train)
    rss_after_load = common.rss_mb()

    clock = common.Clock()
    last_log: dict = {}

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.stamp()

        def on_log(self, args, state, control, logs=None, **kwargs):
            last_log.update(logs or {})

    trainer.add_callback(Stamp())
    # Count sampled tokens at the source: wrap the batch_generation that train() calls.
    inner = trl_ppo.batch_generation

    def counting_batch_generation(model, queries, *a, **kw):
        query_responses, logitss = inner(model, queries, *a, **kw)
        n = common.count_response_tokens(query_responses[:, queries.shape[1]:], tok.eos_token_id)
        clock.tokens += n
        clock.updates_tokens.append(n)
        return query_responses, logitss

    trl_ppo.batch_generation = counting_batch_generation
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    clock.start()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock.stop()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    common.write_result(result_path, common.result(
        s, clock, side="trl112", rss_after_load_mb=rss_after_load, cuda_peak_mb=cuda_peak,
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "trl": trl.__version__},
        extra={"final": {k: last_log.get(k) for k in ("objective/kl", "objective/scores",
                                                     "val/num_eos_tokens", "eps")}}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
