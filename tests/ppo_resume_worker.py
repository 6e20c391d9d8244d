"""Runs a tiny PPO with a checkpoint; used by test_ppo_resume.py as a process to SIGKILL.

    python tests/ppo_resume_worker.py RM_DIR CHECKPOINT OUT_JSON
"""

import json
import sys
from pathlib import Path

import torch

from tasks.ppo import PPOConfig, _load_prompts, build_models
from tasks.ppo_trainer import train_ppo

CFG = PPOConfig(total_episodes=48, batch_size=8, mini_batch_size=4, ppo_epochs=1,
                max_new_tokens=8, checkpoint_every=1, learning_rate=3e-4)


def main(rm_dir: str, checkpoint: str, out_json: str) -> None:
    torch.set_num_threads(1)  # identical arithmetic in every process
    models = build_models(CFG, "demo/base_model", rm_dir, torch.device("cpu"))
    prompts = _load_prompts("demo/data/rl_prompts.jsonl", models.tokenizer, 32)[:32]

    def log(metrics, step):
        print(f"step {step}", flush=True)

    summary = train_ppo(CFG, models, prompts=prompts, seed=0, checkpoint=Path(checkpoint),
                        log_fn=log)
    Path(out_json).write_text(json.dumps({k: summary[k] for k in ("steps", "planned_steps",
                                                                  "stop_reason", "history")}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
