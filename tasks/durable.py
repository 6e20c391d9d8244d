"""What lets a trainer stage survive a fault: checkpoints it resumes from after a kill, a loud
stop when the loss goes NaN or inf, and an output folder that appears whole or not at all.

Used by the stages built on transformers' Trainer (SFT, reward model); PPO has its own
checkpoint (``tasks/ppo_trainer.py``), saved the same way: written beside, then renamed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def checkpoint_dir(out_dir: str) -> str:
    """Where a stage's trainer checkpoints go: beside its output folder, keyed like it
    (``tasks.base.stage_dir``), so a re-run of the same config finds them and a changed config
    never resumes from another's."""
    return f"{out_dir}.checkpoints"


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that was saved to the end, or None.

    Trainer writes ``trainer_state.json`` last (transformers ``Trainer._save_checkpoint``),
    so a checkpoint without it was cut short by the kill and is skipped; its predecessor is
    still there (``save_total_limit`` rotates only after a save finished).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in folder.iterdir()
                   if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
                   and (p / "trainer_state.json").is_file())
    return str(steps[-1][1]) if steps else None


class NonFiniteLoss(RuntimeError):
    """A trainer logged a NaN or inf loss (or gradient norm)."""


def finite_loss_callback(stage: str):
    """A TrainerCallback that stops training with NonFiniteLoss, naming the step, when a
    logged ``loss`` or ``grad_norm`` is NaN or inf. Trainer itself trains on through NaN
    (``logging_nan_inf_filter`` only hides it from the logs, and is turned off by
    ``trainer_args``) and would save the NaN weights as the stage's model."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = {k: v for k, v in (logs or {}).items()
                   if k in ("loss", "grad_norm", "eval_loss") and isinstance(v, (int, float))
                   and not math.isfinite(v)}
            if bad:
                raise NonFiniteLoss(f"{stage}: non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())} "
                                    f"at step {state.global_step}: stopping, nothing saved "
                                    f"(check the learning rate and the data)")

    return FiniteLoss()


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``out_dir``; when the block ends, rename it to ``out_dir``
    (replacing an older one), or delete it if the block raised (disk full, a kill's
    KeyboardInterrupt). A reader of ``out_dir`` thus sees the previous complete output or the
    new complete one, never half a model; a SIGKILL leaves only the ``.partial-*`` folder,
    which the next run ignores."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for root, _, files in os.walk(tmp):  # the data on disk before the name points at it
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
