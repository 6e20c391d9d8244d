"""What both PPO benchmark workers share: settings file, clocks, memory, token counting.

Imported by ``bench/ppo_worker_ours.py`` (project venv) and ``bench/trl112_ppo_worker.py``
(trl 1.12 venv), so it uses only the standard library and torch, and imports torch lazily.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path


def read_settings(path: str) -> dict:
    """The driver's matched settings, plus this run's paths (see bench_ppo.py's ``settings``)."""
    return json.loads(Path(path).read_text())


def setup_torch(settings: dict):
    """Same intra-op threads on both sides; returns torch and the device."""
    import torch

    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    device = torch.device(settings["device"])
    if device.type == "cuda" and settings.get("tf32", True):
        # fp32 weights, TF32 tensor-core matmuls (10-bit mantissa inputs, fp32 accumulate):
        # what both sides ran with in issue 12's table; bf16 runs are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch, device


def rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (less sensitive to a busy machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def count_response_tokens(response, eos_token_id: int) -> int:
    """Real response tokens in a (B, T) batch: up to and including the first EOS, else all T.

    Counted the same way on both sides, from the sampled ids, whatever each trainer pads with.
    """
    import torch

    is_eos = response == eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1,
                        torch.full_like(is_eos[:, 0], response.shape[1], dtype=torch.long))
    return int(first.sum())


class Clock:
    """Wall and CPU time of the training call, with a stamp at the end of every update."""

    def __init__(self):
        self.update_ends: list[float] = []
        self.tokens = 0
        self.updates_tokens: list[int] = []

    def start(self) -> None:
        self.cpu0, self.t0 = cpu_s(), time.perf_counter()

    def stamp(self) -> None:
        self.update_ends.append(time.perf_counter())

    def stop(self) -> None:
        self.t1, self.cpu1 = time.perf_counter(), cpu_s()


def instrument_ours(trainer, clock: Clock, eos_token_id: int):
    """Our side's counters: sampled tokens counted at the source, as the trl side does (wraps
    the ``generate`` that ``tasks.ppo_trainer`` imported, so it is patched there; one cumsum
    per batch), and a ``log_fn`` that stamps the clock and keeps each update's ``ppo/perf/*``
    (phase seconds and shapes: bench/device/ counts FLOPs from them), with the update's
    CUDA allocator counts on a GPU. Returns (log_fn, perf)."""
    inner_generate = trainer.generate

    def counting_generate(*args, **kwargs):
        out = inner_generate(*args, **kwargs)
        n = count_response_tokens(out[0], eos_token_id)
        clock.tokens += n
        clock.updates_tokens.append(n)
        return out

    trainer.generate = counting_generate
    perf: list[dict] = []
    last = cuda_allocator_counts()

    def on_update(metrics: dict, step: int) -> None:
        clock.stamp()
        now = cuda_allocator_counts()
        perf.append({k.removeprefix("ppo/perf/"): v for k, v in metrics.items()
                     if k.startswith("ppo/perf/")} | {k: now[k] - last.get(k, 0) for k in now})
        last.update(now)

    return on_update, perf


def cuda_allocator_counts() -> dict:
    """The CUDA caching allocator's running counts (empty off CUDA): ``cudaMalloc`` and
    ``cudaFree`` calls, and retries (a failed allocation that freed the cache and tried again).
    Per update (``instrument_ours``) they show whether its time went to growing the cache."""
    import torch

    if not torch.cuda.is_initialized():
        return {}
    stats = torch.cuda.memory_stats()
    return {f"cuda_{k}": stats.get(k, 0) for k in ("num_device_alloc", "num_device_free",
                                                   "num_alloc_retries")}


def result(settings: dict, clock: Clock, *, side: str, versions: dict, rss_after_load_mb: float,
           cuda_peak_mb: float | None, extra: dict | None = None) -> dict:
    """One run's numbers: whole-call rates, steady-state rates (first update dropped), memory."""
    episodes = settings["total_episodes"]
    seconds = clock.t1 - clock.t0
    ends = clock.update_ends
    first_update_s = ends[0] - clock.t0 if ends else None
    steady = None
    if len(ends) >= 2:
        steady_s = ends[-1] - ends[0]
        n = len(ends) - 1
        steady = {"updates": n, "seconds": steady_s,
                  "episodes_per_s": n * settings["batch_size"] / steady_s,
                  "tokens_per_s": sum(clock.updates_tokens[1:]) / steady_s}
    return {
        "side": side, "episodes": episodes, "updates": len(ends), "seconds": seconds,
        "episodes_per_s": episodes / seconds, "tokens_per_s": clock.tokens / seconds,
        "response_tokens": clock.tokens,
        "mean_response_len": clock.tokens / episodes,
        "first_update_s": first_update_s, "steady_state": steady,
        "update_s": [round(b - a, 3) for a, b in zip([clock.t0] + ends[:-1], ends)],
        "cpu_s": clock.cpu1 - clock.cpu0, "cpu_s_per_episode": (clock.cpu1 - clock.cpu0) / episodes,
        "peak_rss_mb": rss_mb(), "rss_after_load_mb": rss_after_load_mb,
        "cuda_max_memory_allocated_mb": cuda_peak_mb, "versions": versions,
        "torch_num_threads": __import__("torch").get_num_threads(),
        "python": sys.version.split()[0], "pid": os.getpid(), **(extra or {}),
    }


def write_result(path: str, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
