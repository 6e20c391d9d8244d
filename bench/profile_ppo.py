"""Where one of our PPO updates spends its time, on bench/bench_ppo.py's settings.

    .venv/bin/python bench/profile_ppo.py [--updates 4] [--threads 2] [--out FILE.json]
    python bench/profile_ppo.py SETTINGS.json RESULT.json   # a worker's settings (bench/device/)

Builds the benchmark's models and config (``bench_ppo.prepare_models``, ``ppo_worker_ours.
ppo_config``), then times the phases of ``train_ppo`` per update: generation and scoring (the
trainer's own ``ppo/perf/*`` clocks) and, inside the PPO update, the calls of each minibatch
step (row selection, policy forward, critic forward, losses, backward, gradient clipping,
optimizer step), by wrapping those functions from the outside: the trainer runs unchanged.
The first update is warm-up and is left out. One more update runs under the torch profiler,
its self CPU time grouped by kind of op (matrix multiplies, attention, GELU, ...), and what
no op accounts for (Python, HF module code, the profiler's own bookkeeping).

With a settings file (what bench/bench_ppo.py's workers read; bench/device/bench_gpu.py's
``--probes profile`` writes one) it profiles that run instead: its models, device, precision
and decode cache. On a GPU the wrapped calls wait for the device before their clock stops,
and the profiled update's PPO phase is read off the GPU: kernel time by kind of kernel, how
many launches, and how much of the phase's wall time the GPU sat idle between kernels.
Not a test: timings depend on the machine (run it quiet: ``flock``, load average).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_ppo  # noqa: E402
import ppo_bench_common as common  # noqa: E402
import ppo_worker_ours  # noqa: E402

# CPU: self CPU time of these ops is arithmetic; everything else counted as "other ops".
OP_KINDS = {
    "matrix multiplies": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention (SDPA flash)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "GELU": ("aten::gelu", "aten::gelu_backward"),
    "sampling (exponential_)": ("aten::exponential_",),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "log-softmax, softmax": ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                             "aten::_softmax"),
    "AdamW (fused)": ("aten::_fused_adamw_",),
}


# GPU: kernels by a part of their name, first match wins (cuBLAS/CUTLASS GEMMs on Hopper are
# sm90_xmma_*/nvjet_*/cutlass_*; cuDNN's attention kernels are cudnn_generated_*sdpa*).
KERNEL_KINDS = (
    ("attention", ("fmha", "flash", "sdpa", "attention", "mem_eff")),
    ("matrix multiplies", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("AdamW (fused) and other multi-tensor ops", ("fused_adam", "multi_tensor", "foreach")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("softmax, log-softmax", ("softmax",)),
    ("GELU", ("gelu",)),
    ("reductions (norms, sums, max)", ("reduce",)),
    ("copies, casts, fills", ("memcpy", "memset", "copy", "cat_", "catarray", "fill")),
    ("other elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in low for p in parts)),
                "other kernels")


def kernel_summary(kernels: list[tuple[str, float]], wall_us: float) -> dict:
    """GPU time of one profiled phase from its kernels ``(name, microseconds)``: by kind, the
    ten longest names, launches, and idle = wall time not covered by any kernel (one stream:
    kernels run one after another, so their sum is the time the GPU was busy)."""
    kinds: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for name, us in kernels:
        kinds[kernel_kind(name)] += us
        names[name] += us
    busy = sum(kinds.values())
    return {"wall_ms": wall_us / 1e3, "kernel_ms": busy / 1e3, "launches": len(kernels),
            "idle_share": max(0.0, 1 - busy / wall_us) if wall_us else None,
            "kinds_ms": {k: v / 1e3 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k[:160]: v / 1e3 for k, v in
                               sorted(names.items(), key=lambda kv: -kv[1])[:10]}}


class StepClock:
    """Seconds spent in wrapped calls, by name, counted only inside ``ppo_update`` of an
    update being timed (so the reference and critic forwards of the rollout stay out).
    ``sync`` waits for the device (a GPU returns from a call before its kernels have run)."""

    def __init__(self, sync=lambda: None):
        self.s: dict[str, float] = defaultdict(float)
        self.on = False     # inside ppo_update
        self.timing = False  # this update is timed
        self.sync = sync
        self.threads: set[str] = set()  # threads the timed calls ran in
        self.lock = threading.Lock()  # the critic's thread adds to the same sums

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            self.threads.add(threading.current_thread().name)
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                with self.lock:
                    self.s[name] += time.perf_counter() - t0
        return timed


def profile_run(s: dict, updates: int) -> dict:
    """Train ``updates`` + 2 updates on settings ``s`` (warm-up, timed ones, profiled one) and
    return the report: per-update phase and call seconds, their medians, op or kernel kinds."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    import tasks.ppo as ppo
    import tasks.ppo_trainer as trainer
    from models.rollout import Rollout

    torch, device = common.setup_torch(s)
    cuda = device.type == "cuda"
    s = {**s, "total_episodes": (updates + 2) * s["batch_size"]}
    cfg = ppo_worker_ours.ppo_config(s)
    models = ppo.build_models(cfg, s["policy_dir"], s["rm_dir"], device)
    prompts = ppo._load_prompts(s["prompts_path"], models.tokenizer, cfg.max_prompt_length)

    clock = StepClock(torch.cuda.synchronize if cuda else lambda: None)
    # A compiled update (compile_update) would trace the timers' waits and clock reads into
    # its graphs: its forwards go untimed, inside the update's total only.
    forwards = () if cfg.compile_update else ("response_logprobs", "response_values")
    for name in forwards + ("policy_loss", "value_loss", "clip_grad_norm"):
        setattr(trainer, name, clock.wrap(name, getattr(trainer, name)))
    Rollout.select = clock.wrap("select", Rollout.select)
    torch.Tensor.backward = clock.wrap("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = clock.wrap("optimizer step", torch.optim.AdamW.step)
    inner_update = trainer.ppo_update
    prof: dict = {"p": None}

    def timed_update(*a, **kw):
        clock.on = clock.timing
        try:
            if prof["p"] is None or not cuda:
                return inner_update(*a, **kw)
            # On a GPU the profiled update's PPO phase is marked, so that its kernels can be
            # told from the rollout's; the waits put all of them inside the mark.
            torch.cuda.synchronize()
            with record_function("ppo_update"):
                out = inner_update(*a, **kw)
                torch.cuda.synchronize()
            return out
        finally:
            clock.on = False

    trainer.ppo_update = timed_update
    per_update = []

    def on_update(metrics: dict, step: int) -> None:
        if 2 <= step <= updates + 1:
            per_update.append({**{k.removeprefix("ppo/perf/"): metrics[k] for k in
                                  ("ppo/perf/generation_s", "ppo/perf/scoring_s",
                                   "ppo/perf/update_s")},
                               "seconds": cfg.batch_size / metrics["ppo/perf/episodes_per_s"],
                               **{f"update/{k}": v for k, v in clock.s.items()}})
        clock.s.clear()
        clock.timing = step < updates + 1
        if step == updates + 1:  # the next update runs under the profiler
            prof["p"] = profile(activities=[ProfilerActivity.CPU]
                                + ([ProfilerActivity.CUDA] if cuda else []))
            prof["p"].__enter__()
        elif step == updates + 2:
            prof["p"].__exit__(None, None, None)

    trainer.train_ppo(cfg, models, prompts=prompts, seed=s["seed"], checkpoint=None,
                      log_fn=on_update)

    med = {k: statistics.median(u.get(k, 0.0) for u in per_update) for k in per_update[0]}
    total = med["seconds"]
    rows = [("generation", med["generation_s"]), ("scoring (reference, critic, reward)",
                                                  med["scoring_s"]),
            (f"PPO update ({cfg.ppo_epochs * cfg.batch_size // cfg.mini_batch_size} minibatch "
             "steps)", med["update_s"])]
    named = {"update/select": "  row selection", "update/response_logprobs":
             "  policy forward", "update/response_values": "  critic forward",
             "update/policy_loss": "  policy loss",
             "update/value_loss": "  value loss", "update/backward": "  backward",
             "update/clip_grad_norm": "  gradient clipping", "update/optimizer step":
             "  AdamW step"}
    rows += [(label, med[k]) for k, label in named.items() if k in med]
    ka = prof["p"].key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in ka}
    prof_total = sum(self_us.values())
    kinds = {kind: sum(self_us.get(k, 0) for k in keys) for kind, keys in OP_KINDS.items()}
    kinds["other ops"] = sum(v for k, v in self_us.items()
                             if k.startswith("aten::") and not any(k in keys for keys in
                                                                   OP_KINDS.values()))
    kinds["not in any op (Python, HF modules, autograd and profiler bookkeeping)"] = (
        prof_total - sum(kinds.values()))
    where = f"{s['device']}, {cfg.mixed_precision}" if cuda else f"{s['threads']} threads"
    where += ", update compiled" if cfg.compile_update else ""
    lines = [f"one update of {cfg.batch_size} episodes, median of {len(per_update)} "
             f"(torch {torch.__version__}, {where}): {total * 1e3:.0f} ms",
             "", "| phase | ms per update | share |", "|---|---:|---:|"]
    lines += [f"| {label} | {sec * 1e3:.1f} | {sec / total:.0%} |" for label, sec in rows]
    if len(clock.threads) > 1:
        lines += ["", "The critic's forward and backward ran in a thread of their own beside "
                  "the policy's (critic_thread): its rows overlap the policy's, so the update's "
                  "rows add up to more than the update."]
    lines += ["", f"profiled update: self CPU {prof_total / 1e3:.0f} ms, "
              f"{sum(e.count for e in ka)} events", "", "| kind of op | ms | share |",
              "|---|---:|---:|"]
    lines += [f"| {kind} | {us / 1e3:.1f} | {us / prof_total:.0%} |" for kind, us in kinds.items()]
    report = {"per_update": per_update, "median": med, "compile_update": cfg.compile_update,
              "op_kinds_ms": {k: v / 1e3 for k, v in kinds.items()}}
    events = prof["p"].events() if cuda else []
    marks = [e for e in events if e.name == "ppo_update" and e.device_type == DeviceType.CPU]
    if cuda and not marks:  # keep the rest of the report if this torch's events differ
        report["gpu_update_phase"] = None
        lines += ["", "(no `ppo_update` mark among the profiler's events: GPU kernels not read)"]
    if marks:
        t0, t1 = marks[0].time_range.start, marks[0].time_range.end
        g = kernel_summary([(e.name, e.time_range.elapsed_us()) for e in events
                            if e.device_type == DeviceType.CUDA and e.name != "ppo_update"
                            and t0 <= e.time_range.start <= t1], t1 - t0)
        report["gpu_update_phase"] = g
        lines += ["", f"profiled PPO phase on the GPU: {g['wall_ms']:.0f} ms wall, kernels "
                  f"{g['kernel_ms']:.0f} ms in {g['launches']} launches, idle "
                  f"{g['idle_share']:.0%}", "", "| kind of kernel | ms | share of wall |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {ms:.1f} | {ms / g['wall_ms']:.0%} |" for k, ms in g["kinds_ms"].items()]
    report["table"] = "\n".join(lines)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="?", help="a worker's settings JSON (default: bench_ppo's "
                   "matched settings on demo/base_model, on CPU)")
    p.add_argument("result", nargs="?", help="the report's path with SETTINGS (else --out)")
    p.add_argument("--updates", type=int, default=None,
                   help="timed updates after the warm-up one (default: the settings' "
                        "profile_updates, else 4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/out/profile_ppo.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="profile_ppo_") as tmp:
        if args.settings:
            s = common.read_settings(args.settings)
        else:
            sys.argv = sys.argv[:1]  # bench_ppo's defaults are the matched settings
            bargs = bench_ppo.parse_args()
            bargs.threads = args.threads
            policy_dir, rm_dir = bench_ppo.prepare_models(Path(tmp), None, bargs.seed)
            s = bench_ppo.settings(bargs, policy_dir, rm_dir)
        report = profile_run(s, args.updates or s.get("profile_updates", 4))
    print(report["table"])
    out = Path(args.result or args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
