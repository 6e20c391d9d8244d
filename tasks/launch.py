"""Run a training stage in several processes (one per GPU) under ``accelerate launch``.

When the pipeline's ``launch`` section asks for more than one process, a training stage's
Prefect task does not train in its own process: it writes the stage's inputs as JSON, starts

    python -m accelerate.commands.launch --num_processes N [--config_file F] \\
        -m tasks.stage_worker REQUEST.json

waits for it while streaming its output into the task's log, and reads back the typed result
the main process wrote (``tasks/stage_worker.py``). Every process runs the same ``run_<stage>``
function; the main one saves the model and logs to MLflow. Inputs and results cross the
process boundary as JSON (configs, paths, run ids), never as objects.
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from tasks.base import StageConfig
from tasks.process import free_port, stop_group

TrainingStage = Literal["sft", "reward", "policy"]

STAGES: dict[str, str] = {
    "sft": "tasks.sft:run_sft",
    "reward": "tasks.reward:run_reward",
    "policy": "tasks.policy:run_policy",
}
"""The functions a launch may run, by stage name (a request names a stage, never code)."""

REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchConfig(StageConfig):
    """How the training stages run: in the Prefect task's own process, or in several processes
    (one per GPU, data parallel) started by ``accelerate launch``."""

    num_processes: int = Field(default=1, ge=1)
    """Processes per training stage, usually one per GPU. 1: the stage trains in the task's
    own process; more: the task starts it under ``accelerate launch`` and waits. Batch sizes
    stay global for PPO (``policy.ppo.batch_size`` episodes per update, split over the
    processes) and per process for the TRL stages (``per_device_train_batch_size``)."""
    config_file: str | None = None
    """An accelerate config file: ``deploy/accelerate/ddp.yaml``, ``deepspeed_zero2.yaml`` or
    ``fsdp.yaml`` (sharding applies to SFT, reward, DPO, GRPO and RLOO; our PPO loop is plain
    data parallel). None: plain DDP on this machine (``--multi_gpu``)."""
    stages: list[TrainingStage] = Field(default_factory=lambda: ["sft", "reward", "policy"])
    """Which training stages run launched; the others train in the task's process."""
    cpu: bool = False
    """Run the processes on CPU (gloo backend) even where GPUs are present: for tests and
    debugging. Without GPUs this is what happens anyway."""

    @field_validator("config_file")
    @classmethod
    def _config_file_exists(cls, value: str | None) -> str | None:
        # Checked with the rest of the config, before any stage runs (not an hour in).
        if value is not None and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value

    def applies_to(self, stage: str) -> bool:
        return self.num_processes > 1 and stage in self.stages


class LaunchError(RuntimeError):
    """A launched stage failed; the message ends with the last lines of its output."""


def stage_function(stage: str):
    """The ``run_<stage>`` function a stage name stands for (imported on first use)."""
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def run_stage(launch: LaunchConfig | None, stage: TrainingStage, **inputs: Any):
    """``run_<stage>(**inputs)`` here, or in ``launch.num_processes`` processes if the
    launch section asks for them; the same typed result either way."""
    if launch is None or not launch.applies_to(stage):
        return stage_function(stage)(**inputs)
    return launch_stage(launch, stage, inputs)


# --- the launch ---------------------------------------------------------------------------


def launch_command(launch: LaunchConfig, request: Path, port: int | None) -> list[str]:
    """The ``accelerate launch`` command line for one stage (pure: tests read it)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(launch.num_processes)]
    if launch.config_file is not None:
        cmd += ["--config_file", launch.config_file]
    else:
        # What `accelerate config` would ask; given here so no default config file decides.
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "tasks.stage_worker", str(request)]


def _config_port(config_file: str) -> int | None:
    import yaml

    tree = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
    return tree.get("main_process_port")


def _stage_logger():
    """The Prefect task's logger inside a run (the output lands in the UI), else ours."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # no Prefect run context (a plain call, a script)
        return logging.getLogger("rlhf.launch")


def launch_stage(launch: LaunchConfig, stage: TrainingStage, inputs: dict[str, Any]):
    """Start the stage under ``accelerate launch``, stream its output, return its result."""
    from pydantic import BaseModel, TypeAdapter

    fn = stage_function(stage)
    result_type = typing.get_type_hints(fn)["return"]
    log = _stage_logger()
    # A port in the config file is kept (every machine of a multi-node job must agree on it);
    # otherwise a free one, so concurrent launches on one machine do not collide on 29500.
    port = None
    if launch.config_file is None or _config_port(launch.config_file) is None:
        port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    env.setdefault("TQDM_MININTERVAL", "10")  # progress bars become log lines: fewer of them
    if launch.cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    else:
        import torch

        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "true"  # gloo on CPU: what the processes can do here
    with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage}-launch-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({
            "stage": stage, "result_path": str(result),
            "inputs": {k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
                       for k, v in inputs.items()}}))
        cmd = launch_command(launch, request, port)
        log.info("%s: %s", stage, " ".join(cmd))
        tail: collections.deque[str] = collections.deque(maxlen=30)
        # Its own session: stopping this task stops the launcher and all its processes.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        try:
            for line in proc.stdout:  # text mode turns tqdm's \r into line breaks
                line = line.rstrip()
                if line:
                    tail.append(line)
                    log.info("[%s] %s", stage, line)
            rc = proc.wait()
        finally:
            stop_group(proc, timeout=30)
        answer = json.loads(result.read_text()) if result.exists() else None
        errors = sorted(Path(tmp).glob(f"{result.name}.rank*.error"))
        # The lowest rank that failed (often all of them, with the same error).
        failure = (f"{errors[0].name.split('.')[-2]} failed:\n{errors[0].read_text()}"
                   if errors else "")
    if answer is not None and "data_error" in answer:
        from dataio import DataError

        raise DataError(**answer["data_error"])  # bad input stays bad input: exit 2 in the CLI
    if rc != 0 or answer is None:
        raise LaunchError(f"{stage}: accelerate launch with {launch.num_processes} processes "
                          f"exited with status {rc}{'' if answer else ' and no result'}; "
                          + (failure or "its last lines:\n" + "\n".join(tail)))
    return TypeAdapter(result_type).validate_python(answer["result"])
