"""Runs the SFT or reward stage on a slice of the demo data with a checkpoint every 2 steps;
test_faults_kill.py runs it as a process to SIGKILL.

    python tests/stage_resume_worker.py sft|reward WORKDIR CTX_JSON OUT_DIR [PAUSE_AT_STEP]

With PAUSE_AT_STEP, it prints ``saved N`` after each checkpoint and stops dead (sleeps) after
the one at that step, so the test kills it mid-training at a known step; without, it runs to
the end and writes the stage result to OUT_DIR.result.json.
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from tasks.base import BaseModelConfig, TrackingContext
from tasks.reward import RewardConfig, run_reward
from tasks.sft import SFTConfig, run_sft

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "demo" / "data"
SFT = SFTConfig(max_steps=8, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=1e-3, max_length=96, logging_steps=1, save_steps=2,
                eval_fraction=0.0)
REWARD = RewardConfig(max_steps=8, per_device_train_batch_size=8, learning_rate=5e-4,
                      max_length=96, logging_steps=1, save_steps=2, normalize_samples=0,
                      heldout_seed_offset=None)


def head(src: Path, dst: Path, n: int) -> str:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def run(stage: str, workdir: Path, ctx: TrackingContext, out_dir: str):
    """The stage, as the pipeline runs it (same function, same arguments)."""
    if stage == "sft":
        return run_sft(SFT, base_model=BaseModelConfig(path=str(REPO / "demo" / "base_model")),
                       data_uri=head(DATA / "sft.jsonl", workdir / "sft.jsonl", 64),
                       out_dir=out_dir, seed=0, ctx=ctx)
    return run_reward(REWARD, sft_model_uri=str(REPO / "demo" / "base_model"),
                      train_uri=head(DATA / "preferences.jsonl", workdir / "prefs.jsonl", 64),
                      eval_uri=head(DATA / "eval_pairs.jsonl", workdir / "eval.jsonl", 16),
                      rl_prompts_uri=str(DATA / "rl_prompts.jsonl"), out_dir=out_dir, seed=0,
                      ctx=ctx)


class PauseAfterSave(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        print(f"saved {state.global_step}", flush=True)
        if state.global_step == self.step:
            time.sleep(600)  # the test kills us here: mid-training, checkpoint on disk


def main(stage: str, workdir: str, ctx_json: str, out_dir: str, pause_at: str | None = None):
    torch.set_num_threads(1)  # identical arithmetic in every process
    if pause_at is not None:
        import transformers

        # Every Trainer this process builds gets the pause (the stage builds its own).
        init = transformers.Trainer.__init__

        def patched(self, *a, **kw):
            kw["callbacks"] = list(kw.get("callbacks") or []) + [PauseAfterSave(int(pause_at))]
            init(self, *a, **kw)

        transformers.Trainer.__init__ = patched
    result = run(stage, Path(workdir), TrackingContext.model_validate_json(ctx_json), out_dir)
    Path(out_dir + ".result.json").write_text(result.model_dump_json())


if __name__ == "__main__":
    main(*sys.argv[1:6])
