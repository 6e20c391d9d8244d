"""Where one of our PPO updates spends its time, on bench/bench_ppo.py's settings (CPU).

    .venv/bin/python bench/profile_ppo.py [--updates 4] [--threads 2] [--out FILE.json]

Builds the benchmark's models and config (``bench_ppo.prepare_models``, ``ppo_worker_ours.
ppo_config``), then times the phases of ``train_ppo`` per update: generation and scoring (the
trainer's own ``ppo/perf/*`` clocks) and, inside the PPO update, the calls of each minibatch
step (row selection, policy forward, critic forward, losses, backward, gradient clipping,
optimizer step), by wrapping those functions from the outside: the trainer runs unchanged.
The first update is warm-up and is left out. One more update runs under the torch profiler,
its self CPU time grouped by kind of op (matrix multiplies, attention, GELU, ...), and what
no op accounts for (Python, HF module code, the profiler's own bookkeeping).
Not a test: timings depend on the machine (run it quiet: ``flock``, load average).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_ppo  # noqa: E402
import ppo_worker_ours  # noqa: E402

# Self CPU time of these ops is arithmetic; everything else counted as "other ops".
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


class StepClock:
    """Seconds spent in wrapped calls, by name, counted only inside ``ppo_update`` of an
    update being timed (so the reference and critic forwards of the rollout stay out)."""

    def __init__(self):
        self.s: dict[str, float] = defaultdict(float)
        self.on = False     # inside ppo_update
        self.timing = False  # this update is timed

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[name] += time.perf_counter() - t0
        return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=4, help="timed updates after the warm-up one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/out/profile_ppo.json"))
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    import tasks.ppo as ppo
    import tasks.ppo_trainer as trainer
    from models.rollout import Rollout

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="profile_ppo_") as tmp:
        sys.argv = sys.argv[:1]  # bench_ppo's defaults are the matched settings
        bargs = bench_ppo.parse_args()
        policy_dir, rm_dir = bench_ppo.prepare_models(Path(tmp), None, bargs.seed)
        s = bench_ppo.settings(bargs, policy_dir, rm_dir)
        n = args.updates + 2  # warm-up, timed updates, the profiled one
        s["total_episodes"] = n * s["batch_size"]
        cfg = ppo_worker_ours.ppo_config(s)
        torch.manual_seed(s["seed"])
        models = ppo.build_models(cfg, policy_dir, rm_dir, torch.device("cpu"))
        prompts = ppo._load_prompts(s["prompts_path"], models.tokenizer, cfg.max_prompt_length)

        clock = StepClock()
        for name in ("response_logprobs", "response_values", "policy_loss", "value_loss",
                     "clip_grad_norm"):
            setattr(trainer, name, clock.wrap(name, getattr(trainer, name)))
        Rollout.select = clock.wrap("select", Rollout.select)
        torch.Tensor.backward = clock.wrap("backward", torch.Tensor.backward)
        torch.optim.AdamW.step = clock.wrap("optimizer step", torch.optim.AdamW.step)
        inner_update = trainer.ppo_update

        def timed_update(*a, **kw):
            clock.on = clock.timing
            try:
                return inner_update(*a, **kw)
            finally:
                clock.on = False

        trainer.ppo_update = timed_update
        per_update, prof = [], {"p": None}

        def on_update(metrics: dict, step: int) -> None:
            if 2 <= step <= args.updates + 1:
                per_update.append({**{k.removeprefix("ppo/perf/"): metrics[k] for k in
                                      ("ppo/perf/generation_s", "ppo/perf/scoring_s",
                                       "ppo/perf/update_s")},
                                   "seconds": cfg.batch_size / metrics["ppo/perf/episodes_per_s"],
                                   **{f"update/{k}": v for k, v in clock.s.items()}})
            clock.s.clear()
            clock.timing = step < args.updates + 1
            if step == args.updates + 1:  # the next update runs under the profiler
                prof["p"] = profile(activities=[ProfilerActivity.CPU])
                prof["p"].__enter__()
            elif step == args.updates + 2:
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
    rows += [(label, med.get(k, 0.0)) for k, label in named.items()]
    ka = prof["p"].key_averages()
    self_us = {e.key: e.self_cpu_time_total for e in ka}
    prof_total = sum(self_us.values())
    kinds = {kind: sum(self_us.get(k, 0) for k in keys) for kind, keys in OP_KINDS.items()}
    kinds["other ops"] = sum(v for k, v in self_us.items()
                             if k.startswith("aten::") and not any(k in keys for keys in
                                                                   OP_KINDS.values()))
    kinds["not in any op (Python, HF modules, autograd and profiler bookkeeping)"] = (
        prof_total - sum(kinds.values()))
    lines = [f"one update of {cfg.batch_size} episodes, median of {len(per_update)} "
             f"(torch {torch.__version__}, {args.threads} threads): {total * 1e3:.0f} ms",
             "", "| phase | ms per update | share |", "|---|---:|---:|"]
    lines += [f"| {label} | {sec * 1e3:.1f} | {sec / total:.0%} |" for label, sec in rows]
    lines += ["", f"profiled update: self CPU {prof_total / 1e3:.0f} ms, "
              f"{sum(e.count for e in ka)} events", "", "| kind of op | ms | share |",
              "|---|---:|---:|"]
    lines += [f"| {kind} | {us / 1e3:.1f} | {us / prof_total:.0%} |" for kind, us in kinds.items()]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"per_update": per_update, "median": med,
                               "op_kinds_ms": {k: v / 1e3 for k, v in kinds.items()},
                               "table": text}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
