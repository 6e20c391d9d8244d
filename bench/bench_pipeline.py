"""Benchmark: what orchestration costs on the demo pipeline.

    PYTHONPATH=. .venv/bin/python bench/bench_pipeline.py [--config configs/demo.yaml]
        [--set k=v ...] [--max-load 1.5] [--max-wait 900] [--out bench/out/bench_pipeline.json]

Runs ``rlhf run`` twice in a fresh working folder (its own ``output_dir``, SQLite MLflow store
and ``PREFECT_HOME``, so the first run is a first run: a new Prefect database, no stage to
reuse): a **first run** and an **unchanged re-run** of the same config. Each run is one
subprocess, ``bench/pipeline_worker.py``, which runs the CLI unchanged and attributes every
second of its main thread, exclusively, to one of: stage compute (the body of ``run_sft``,
``run_reward``, ``run_policy``, ``run_evaluate``: data and model loading, training,
generation, saving), data validation (``run_validation``), imports, MLflow calls, Prefect's
temporary API server, cache keys, and what is left: Prefect's flow and task engine, the flow's
own code and the CLI. Wall time is measured here, around the subprocess, so interpreter start
and exit (the Prefect server's atexit stop) are in it too.

Overhead = wall - stage compute: everything a run costs besides the four stages' own work.
Memory: peak RSS of the pipeline process per stage (sampled every 50 ms inside it) and of
its children (the Prefect API server), and the process's ``VmHWM``.

Each run first waits for a quiet machine (1-minute load average below ``--max-load``, at most
``--max-wait`` s) and records the load and the CPU share other processes took meanwhile; a
run that did not get a quiet machine is labelled ``quiet: false``. The demo's headline
metrics are recorded so a speed-up that moved them is caught. Not a test: timings depend on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench.* too
from bench.bench_ppo import busy_jiffies, machine_info, wait_for_quiet  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "bench" / "pipeline_worker.py"
COMPUTE_STAGES = ("sft", "reward", "policy", "evaluate")
"""Stages whose body is the pipeline's real work; validation is reported on its own."""
RUNS = ("first", "rerun")
GOALS = {"overhead_share": 0.02, "rerun_share": 0.05, "wall_s": 60.0, "peak_rss_gb": 2.0}
MAIN = "MainThread"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides passed to rlhf run (output_dir and tracking.uri are "
                        "set to the working folder)")
    p.add_argument("--workdir", default=None,
                   help="working folder (default: a new temporary one, removed afterwards)")
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait until the 1-minute load average is below this before each run")
    p.add_argument("--max-wait", type=float, default=900,
                   help="seconds to wait for a quiet machine before running anyway (recorded)")
    p.add_argument("--out", default=str(ROOT / "bench/out/bench_pipeline.json"))
    return p.parse_args(argv)


# --- accounting (pure) -----------------------------------------------------------------------


def breakdown(worker: dict, wall_s: float) -> dict:
    """Exclusive seconds per category of one run's main thread, from the worker's events.

    ``events`` are ``(category, name, stage, thread, start, end, self_s)``; a wrapped call's
    ``self_s`` already excludes the wrapped calls inside it, so the sums add up to at most the
    thread's time and the remainder is what no wrapper covers.
    """
    main = [e for e in worker["events"] if e[3] == MAIN]
    by_cat: dict[str, float] = {}
    by_stage: dict[str, dict[str, float]] = {}
    for cat, _name, stage, _thread, _s, _e, self_s in main:
        by_cat[cat] = by_cat.get(cat, 0.0) + self_s
        key = "compute" if cat == "stage" else cat
        by_stage.setdefault(stage, {})
        by_stage[stage][key] = by_stage[stage].get(key, 0.0) + self_s
    compute = sum(by_stage.get(s, {}).get("compute", 0.0) for s in COMPUTE_STAGES)
    validation = by_stage.get("validation", {}).get("compute", 0.0)
    bookkeeping = sum(v.get("compute", 0.0) for s, v in by_stage.items()
                      if s not in COMPUTE_STAGES and s != "validation")
    covered = sum(by_cat.values())
    engine = worker["end_s"] - covered
    parts = {
        "stage_compute": compute,
        "validation": validation,
        "imports": by_cat.get("import", 0.0),
        "mlflow": by_cat.get("mlflow", 0.0),
        "prefect_api_server": by_cat.get("prefect_api", 0.0),
        "cache_keys": by_cat.get("cache_key", 0.0),
        "gate_report_bodies": bookkeeping,
        "prefect_engine_flow_cli": engine,
        "interpreter_start_exit": wall_s - worker["end_s"],
    }
    overhead = wall_s - compute
    return {"wall_s": wall_s, "parts_s": parts, "overhead_s": overhead,
            "overhead_share": overhead / wall_s,
            "orchestration_tracking_s": parts["mlflow"] + parts["prefect_api_server"]
            + parts["prefect_engine_flow_cli"] + parts["cache_keys"]
            + parts["gate_report_bodies"],
            "per_stage_s": by_stage,
            "other_threads": sorted({e[3] for e in worker["events"] if e[3] != MAIN})}


def hotspots(worker: dict, n: int = 12) -> dict:
    """Where the overhead goes: the MLflow calls by total time (and count), and the
    top-level imports (an import not inside another one) by wall time, with their stage."""
    main = [e for e in worker["events"] if e[3] == MAIN]
    calls: dict[str, list] = {}
    for cat, name, _stage, _t, _s, _e, self_s in main:
        if cat == "mlflow":
            c = calls.setdefault(name, [0.0, 0])
            c[0] += self_s
            c[1] += 1
    imports = sorted((e for e in main if e[0] == "import"), key=lambda e: (e[4], -e[5]))
    top, end = [], -1.0
    for _cat, module, stage, _t, start, stop, _self in imports:
        if start >= end:  # not nested in the previous top-level import
            top.append((module, stage, stop - start))
            end = stop
    return {"mlflow_calls": [{"call": k, "s": round(v[0], 2), "count": v[1]} for k, v in
                             sorted(calls.items(), key=lambda kv: -kv[1][0])[:n]],
            "top_level_imports": [{"module": m, "stage": st, "s": round(w, 2)} for m, st, w in
                                  sorted(top, key=lambda t: -t[2])[:n]]}


def stage_windows(worker: dict) -> list[tuple[str, float, float]]:
    """(stage, start, end) of each stage body that ran, in order."""
    return sorted(((e[1], e[4], e[5]) for e in worker["events"]
                   if e[0] == "stage" and e[3] == MAIN), key=lambda w: w[1])


def memory(worker: dict) -> dict:
    """Peak RSS (GB) of the pipeline process and of its children, overall and per stage
    window (samples every 50 ms; children every 0.5 s)."""
    gb = 1 / 2**20
    samples = worker["rss_samples"]

    def peak(lo: float, hi: float) -> dict:
        inside = [s for s in samples if lo <= s[0] <= hi]
        if not inside:
            return {"process_gb": None, "children_gb": None}
        return {"process_gb": round(max(s[1] for s in inside) * gb, 3),
                "children_gb": round(max(s[2] for s in inside) * gb, 3)}

    per_stage = {stage: {**peak(lo, hi), "wall_s": round(hi - lo, 2)}
                 for stage, lo, hi in stage_windows(worker)}
    return {"process_peak_gb": round(worker["vm_hwm_kb"] * gb, 3),
            "process_plus_children_peak_gb": round(max(
                (s[1] + s[2] for s in samples), default=0) * gb, 3),
            "per_stage": per_stage}


# --- running ---------------------------------------------------------------------------------


def run_once(label: str, args: argparse.Namespace, work: Path, env: dict) -> dict:
    quiet = wait_for_quiet(args.max_load, args.max_wait)
    raw = work / f"{label}.worker.json"
    cmd = [sys.executable, str(WORKER), str(raw), "--", "run", "--config", args.config,
           "--set", f"output_dir={work / 'runs'}",
           "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"]
    for o in args.overrides:
        cmd += ["--set", o]
    child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = busy_jiffies()
    t0 = time.perf_counter()
    with open(work / f"{label}.log", "w") as log:
        # Its own process group, so an interrupted bench also stops the Prefect API server
        # the worker started (its atexit hook does not run on a signal).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait()
        except BaseException:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
    wall = time.perf_counter() - t0
    busy1, total1 = busy_jiffies()
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        tail = (work / f"{label}.log").read_text()[-3000:]
        raise SystemExit(f"{label} run failed (exit {rc}):\n{tail}")
    tick = os.sysconf("SC_CLK_TCK")
    cpu = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    worker = json.loads(raw.read_text())
    metrics = worker["result"]["metrics"]
    return {"label": label, **quiet, "loadavg_after": list(os.getloadavg()),
            "foreign_cpu_share": max(0.0, (busy1 - busy0) / tick - cpu)
            / max((total1 - total0) / tick, 1e-9),
            "cpu_s": cpu, "result": worker["result"]["result"],
            "reused": worker["result"].get("reused"),
            "kl": metrics.get("eval/kl_policy_sft"),
            "win_rate": metrics.get("eval/win_rate_gold"), "metrics": metrics,
            **breakdown(worker, wall), "memory": memory(worker), "hotspots": hotspots(worker)}


def table(runs: dict[str, dict]) -> str:
    """The README's markdown table."""
    first, rerun = runs["first"], runs.get("rerun")
    cols = [("first run", first)] + ([("unchanged re-run", rerun)] if rerun else [])
    rows = [("wall", lambda r: r["wall_s"])] + [
        (name, (lambda k: lambda r: r["parts_s"][k])(key)) for name, key in (
            ("stage compute (sft, reward, policy, evaluate bodies)", "stage_compute"),
            ("data validation (great-expectations)", "validation"),
            ("imports (first load of each module)", "imports"),
            ("MLflow calls", "mlflow"),
            ("Prefect temporary API server start/stop", "prefect_api_server"),
            ("cache keys (hashing inputs and code)", "cache_keys"),
            ("gate, report bodies", "gate_report_bodies"),
            ("Prefect engine, flow code, CLI (the rest)", "prefect_engine_flow_cli"),
            ("interpreter start, exit", "interpreter_start_exit"))]
    out = ["| seconds | " + " | ".join(c for c, _ in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for name, get in rows:
        out.append(f"| {name} | " + " | ".join(f"{get(r):.1f}" for _, r in cols) + " |")
    out.append("| **overhead** (wall - stage compute) | " + " | ".join(
        f"{r['overhead_s']:.1f} ({100 * r['overhead_share']:.0f}%)" for _, r in cols) + " |")
    return "\n".join(out)


def memory_table(run: dict) -> str:
    out = ["| stage | wall s | peak RSS, pipeline process GB | Prefect server GB |",
           "|---|---:|---:|---:|"]
    for stage, m in run["memory"]["per_stage"].items():
        out.append(f"| {stage} | {m['wall_s']:.1f} | {m['process_gb']} | {m['children_gb']} |")
    out.append(f"| whole run (VmHWM; + children) | {run['wall_s']:.1f} | "
               f"{run['memory']['process_peak_gb']} | "
               f"{run['memory']['process_plus_children_peak_gb']} (sum) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="benchpipe-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / "prefect")}
    runs: dict[str, dict] = {}
    try:
        for label in RUNS:
            runs[label] = run_once(label, args, work, env)
            r = runs[label]
            print(f"{label}: {r['wall_s']:.1f} s wall, overhead {r['overhead_s']:.1f} s "
                  f"({100 * r['overhead_share']:.0f}%), load {r['loadavg_before'][0]:.2f}, "
                  f"KL {r['kl']}, win rate {r['win_rate']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    first, rerun = runs["first"], runs["rerun"]
    summary = {
        "overhead_share": first["overhead_share"],
        "rerun_share": rerun["wall_s"] / first["wall_s"],
        "wall_s": first["wall_s"],
        "peak_rss_gb": max(r["memory"]["process_plus_children_peak_gb"] for r in runs.values()),
    }
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "config": args.config, "overrides": args.overrides, "machine": machine_info(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "goals": GOALS, "summary": summary,
           "goals_met": {k: summary[k] <= v for k, v in GOALS.items()},
           "all_quiet": all(r["quiet"] for r in runs.values()), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    md = table(runs) + "\n\n" + memory_table(first)
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    print(md)
    print(json.dumps({"summary": summary, "goals_met": out["goals_met"],
                      "all_quiet": out["all_quiet"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
