"""Benchmark: our PPO (tasks/ppo.py) vs trl 1.12's PPOTrainer at matched settings.

    .venv/bin/python bench/bench_ppo.py [--episodes 512] [--repeats 3] [--device cpu]
                                        [--model-config '{"n_layer": 12, "n_embd": 768, "n_head": 12}']

Both sides train the same tiny GPT-2 (``demo/base_model``, or a larger GPT-2 built from
``--model-config`` with random weights) as policy, reference, reward model and value model,
on the same prompts, batch, response length and PPO epochs (see ``settings``). Each run is
its own subprocess: ours with this venv's python, trl's with ``bench/.venv-trl112`` (created
on first use: torch==2.13.0 pinned first so pip takes the CPU wheel, then trl==1.12.0 and
whatever transformers it resolves). Runs alternate sides, ``--repeats`` times each, and each
waits for a quiet machine (1-minute load average below ``--max-load``) first.

Measured from the outside, the same way on both sides: wall seconds of the training call
(model loading excluded; it includes the first update's warm-up, reported apart as
``first_update_s`` and a ``steady_state`` rate over the later updates), episodes/s, response
tokens/s (tokens up to and including the first EOS, counted from the sampled ids), CPU
seconds, peak RSS of the worker (and CUDA peak allocated on a GPU). Results:
``bench/out/bench_ppo.json``; a markdown table is printed and written beside it. Not a test:
timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SIDES = ("ours", "trl112")
WORKERS = {"ours": BENCH / "ppo_worker_ours.py", "trl112": BENCH / "trl112_ppo_worker.py"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=512, help="episodes per run (>= 8 updates)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating sides")
    p.add_argument("--batch-size", type=int, default=64, help="episodes per PPO update")
    p.add_argument("--mini-batches", type=int, default=4, help="optimiser steps per PPO epoch")
    p.add_argument("--response-length", type=int, default=24, help="max new tokens")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model-config", default=None,
                   help="JSON (inline or a file) of GPT-2 config overrides, e.g. "
                        "'{\"n_layer\": 12, \"n_embd\": 768, \"n_head\": 12}': a random-init "
                        "GPT-2 with the demo tokenizer instead of demo/base_model")
    p.add_argument("--prompts", default=str(ROOT / "demo/data/rl_prompts.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait until the 1-minute load average is below this before each run")
    p.add_argument("--max-wait", type=float, default=300,
                   help="seconds to wait for a quiet machine before running anyway (recorded)")
    p.add_argument("--max-foreign", type=float, default=0.2,
                   help="a run during which other processes used more than this share of the "
                        "machine's CPU is marked contended and retried")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a contended run")
    p.add_argument("--sides", default="ours,trl112", help="comma-separated subset of ours,trl112")
    p.add_argument("--trl-venv", default=str(BENCH / ".venv-trl112"))
    p.add_argument("--out", default=str(BENCH / "out/bench_ppo.json"))
    return p.parse_args()


MAX_PROMPT_LENGTH = 32  # prompt tokens kept (the demo prompts are shorter)


def settings(args: argparse.Namespace, policy_dir: str, rm_dir: str) -> dict:
    """The matched settings both workers read. PPO constants follow both trainers' defaults."""
    return {
        "policy_dir": policy_dir, "rm_dir": rm_dir, "prompts_path": args.prompts,
        "total_episodes": args.episodes, "batch_size": args.batch_size,
        "mini_batches": args.mini_batches, "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs, "learning_rate": args.learning_rate,
        "max_prompt_length": MAX_PROMPT_LENGTH, "temperature": 1.0, "kl_coef": 0.05,
        "missing_eos_penalty": 1.0, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
        "gamma": 1.0, "lam": 0.95, "seed": args.seed, "threads": args.threads,
        "device": args.device,
    }


# --- set-up -------------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> dict:
    """Create the trl 1.12 venv if missing; return its versions and ``pip check`` verdict."""
    py = venv / "bin/python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin/pip"), "install", "-q"]
        # torch first and pinned: a looser spec may pull a multi-GB CUDA build.
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + ["trl==1.12.0"], check=True)
    check = subprocess.run([str(venv / "bin/pip"), "check"], capture_output=True, text=True)
    vers = subprocess.run([str(py), "-c", "import torch, transformers, trl, accelerate; print("
                           "torch.__version__, transformers.__version__, trl.__version__, "
                           "accelerate.__version__)"], capture_output=True, text=True, check=True)
    torch_v, tf_v, trl_v, acc_v = vers.stdout.split()
    return {"python": str(py), "pip_check": check.stdout.strip() or check.stderr.strip(),
            "torch": torch_v, "transformers": tf_v, "trl": trl_v, "accelerate": acc_v}


def prepare_models(tmp: Path, model_config: str | None, seed: int) -> tuple[str, str]:
    """Policy dir (demo/base_model, or a GPT-2 built from overrides) and a reward-model dir.

    The reward model is the policy's backbone with a fresh scalar head and an identity
    ``RewardNorm`` (as in tests/test_ppo_options.py), so both trainers see the same raw scores.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from models.loading import load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm

    base = ROOT / "demo/base_model"
    tok = load_tokenizer(str(base))
    policy_dir = str(base)
    if model_config:
        text = Path(model_config).read_text() if Path(model_config).is_file() else model_config
        cfg = GPT2Config.from_pretrained(str(base))
        for k, v in json.loads(text).items():
            setattr(cfg, k, v)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(cfg)
        policy_dir = str(tmp / "policy")
        model.save_pretrained(policy_dir)
        tok.save_pretrained(policy_dir)
        shutil.copy(base / "generation_config.json", Path(policy_dir) / "generation_config.json")
    torch.manual_seed(seed)
    rm = load_sequence_scorer(policy_dir)
    rm.config.pad_token_id = tok.pad_token_id
    rm_dir = str(tmp / "rm")
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    RewardNorm(1.0, 0.0, 1.0).save(rm_dir)
    n_params = sum(p.numel() for p in rm.parameters())
    print(f"models: policy {policy_dir} ({n_params / 1e6:.2f} M params), reward model {rm_dir}")
    return policy_dir, rm_dir


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "mem_total_gb": round(int(mem) / 2**20, 1), "git_commit": git("rev-parse", "HEAD"),
            # uncommitted edits to the code under test change what "ours" means: record them
            "uncommitted_in_ppo_code": git("status", "--short", "--", "tasks", "models")}


# --- measuring ------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, max_wait: float) -> dict:
    """Block until the 1-minute load average is below ``max_load`` (or ``max_wait`` passes)."""
    t0 = time.monotonic()
    while (load := os.getloadavg())[0] >= max_load and time.monotonic() - t0 < max_wait:
        time.sleep(5)
    return {"loadavg_before": list(load), "waited_s": round(time.monotonic() - t0, 1),
            "quiet": load[0] < max_load}


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]  # idle + iowait
    return sum(f) - idle, sum(f)


def run_worker(side: str, python: str, s: dict, out_dir: Path, tag: str,
               timeout: float | None = None) -> dict:
    """One worker run; also measures how much CPU other processes took meanwhile. A worker
    still running after ``timeout`` seconds is killed and reported as failed."""
    import resource

    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = busy_jiffies()
    r = _run_worker(side, python, s, out_dir, tag, timeout)
    busy1, total1 = busy_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = os.sysconf("SC_CLK_TCK")
    child_cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    # busy CPU-seconds on the machine minus the worker's own = what everyone else used
    foreign = max(0.0, (busy1 - busy0) / tick - child_cpu)
    r["foreign_cpu_share"] = foreign / max((total1 - total0) / tick, 1e-9)
    return r


def _run_worker(side: str, python: str, s: dict, out_dir: Path, tag: str,
                timeout: float | None) -> dict:
    settings_path, result_path = out_dir / f"{tag}.settings.json", out_dir / f"{tag}.json"
    settings_path.write_text(json.dumps(s, indent=2))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(s["threads"]), "MKL_NUM_THREADS": str(s["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **s.get("env", {})}
    with open(out_dir / f"{tag}.log", "w") as log:
        try:
            proc = subprocess.run([python, str(WORKERS[side]), str(settings_path),
                                   str(result_path)], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{side} worker still running after {timeout:.0f} s, killed; "
                               f"see {out_dir / tag}.log") from None
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"{side} worker failed (rc {proc.returncode}); see {out_dir / tag}.log")
    return json.loads(result_path.read_text())


def summarise(all_runs: list[dict], sides: list[str]) -> dict:
    """Medians per side over the uncontended runs (all runs of a side if none was clean)."""
    out = {}
    for side in sides:
        clean = [r for r in all_runs if r["side"] == side and not r["contended"]]
        mine = clean or [r for r in all_runs if r["side"] == side]
        med = lambda _side, key: statistics.median(r[key] for r in mine)  # noqa: E731
        out[side] = {
            "runs": len(mine), "only_clean_runs": bool(clean),
            "foreign_cpu_share": [round(r["foreign_cpu_share"], 3) for r in mine],
            "episodes_per_s": med(side, "episodes_per_s"), "tokens_per_s": med(side, "tokens_per_s"),
            "steady_episodes_per_s": statistics.median(r["steady_state"]["episodes_per_s"]
                                                       for r in mine if r["steady_state"]),
            "cpu_s_per_episode": med(side, "cpu_s_per_episode"),
            "mean_response_len": med(side, "mean_response_len"),
            "peak_rss_mb": med(side, "peak_rss_mb"), "rss_after_load_mb": med(side, "rss_after_load_mb"),
            "cuda_max_memory_allocated_mb": (med(side, "cuda_max_memory_allocated_mb")
                                             if mine[0]["cuda_max_memory_allocated_mb"] else None),
            "loadavg_before": [r["loadavg_before"][0] for r in mine],
            "loadavg_after": [r["loadavg_after"][0] for r in mine],
        }
    if set(SIDES) <= set(sides):
        o, t = out["ours"], out["trl112"]
        out["ratio_episodes_per_s"] = o["episodes_per_s"] / t["episodes_per_s"]
        out["ratio_steady_episodes_per_s"] = o["steady_episodes_per_s"] / t["steady_episodes_per_s"]
        out["ratio_cpu_s_per_episode"] = t["cpu_s_per_episode"] / o["cpu_s_per_episode"]
    return out


def table(summary: dict, sides: list[str]) -> str:
    rows = ["| side | episodes/s | tokens/s | steady episodes/s | CPU s/episode | resp. len "
            "| peak RSS MB | load avg before (runs) | others' CPU share (runs) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for side in sides:
        s = summary[side]
        rows.append(f"| {side} | {s['episodes_per_s']:.1f} | {s['tokens_per_s']:.0f} | "
                    f"{s['steady_episodes_per_s']:.1f} | {s['cpu_s_per_episode']:.4f} | "
                    f"{s['mean_response_len']:.1f} | {s['peak_rss_mb']:.0f} | "
                    f"{', '.join(f'{x:.2f}' for x in s['loadavg_before'])} | "
                    f"{', '.join(f'{x:.2f}' for x in s['foreign_cpu_share'])} |")
    if "ratio_episodes_per_s" in summary:
        rows.append(f"\nours / trl112: episodes/s x{summary['ratio_episodes_per_s']:.2f} "
                    f"(steady state x{summary['ratio_steady_episodes_per_s']:.2f}, "
                    f"CPU per episode x{summary['ratio_cpu_s_per_episode']:.2f})")
    return "\n".join(rows)


def main() -> None:
    args = parse_args()
    sides = [s for s in args.sides.split(",") if s]
    if args.episodes < 8 * args.batch_size:
        print(f"note: {args.episodes} episodes is fewer than 8 updates of {args.batch_size}")
    out = Path(args.out)
    run_dir = out.parent / "bench_ppo_runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    pythons = {"ours": sys.executable}
    trl_env = None
    if "trl112" in sides:
        trl_env = ensure_trl_venv(Path(args.trl_venv))
        pythons["trl112"] = trl_env["python"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        policy_dir, rm_dir = prepare_models(Path(tmp), args.model_config, args.seed)
        s = settings(args, policy_dir, rm_dir)
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]  # alternate who goes first
            for side in order:
                for attempt in range(args.retries + 1):
                    quiet = wait_for_quiet(args.max_load, args.max_wait)
                    r = run_worker(side, pythons[side], s, run_dir, f"{side}_{rep}_{attempt}")
                    r.update(quiet, repeat=rep, attempt=attempt,
                             loadavg_after=list(os.getloadavg()))
                    r["contended"] = r["foreign_cpu_share"] > args.max_foreign
                    runs.append(r)
                    print(f"[{rep}.{attempt}] {side}: {r['episodes_per_s']:.1f} episodes/s, "
                          f"{r['tokens_per_s']:.0f} tokens/s, {r['seconds']:.1f} s, "
                          f"peak RSS {r['peak_rss_mb']:.0f} MB, load "
                          f"{quiet['loadavg_before'][0]:.2f}, others' CPU share "
                          f"{r['foreign_cpu_share']:.2f}{' (CONTENDED)' if r['contended'] else ''}",
                          flush=True)
                    if not r["contended"]:
                        break
    summary = summarise(runs, sides)
    md = table(summary, sides)
    command = " ".join([".venv/bin/python", "bench/bench_ppo.py", *sys.argv[1:]])
    report = {"command": command, "settings": {k: v for k, v in s.items()
                                               if k not in ("policy_dir", "rm_dir")},
              "model": args.model_config or "demo/base_model", "machine": machine_info(),
              "ours_env": {"python": sys.executable}, "trl112_env": trl_env,
              "tokens_counted_as": "response tokens up to and including the first EOS",
              "summary": summary, "runs": runs}
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(f"`{command}`\n\n{md}\n")
    print(md)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
