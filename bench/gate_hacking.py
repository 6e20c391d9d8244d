"""Does the gate refuse a reward-hacking policy, with and without a gold judge?

Runs the whole pipeline (``rlhf run``) on the demo and on its length-biased variant
(``configs/demo-length-biased.yaml``), each with the gold judge and without it, for 3 seeds:
12 runs, two at a time, each in its own output folder and MLflow store. Prints (and writes to
``bench/out/gate_hacking/report.md``) one row per run: the gate's result, the win rates, the
lengths, how often the held-out reward model prefers the longer response, KL, repetition and
the checks that failed.

    .venv/bin/python bench/gate_hacking.py [--seeds 0 1 2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"demo, gold judge": ("configs/demo.yaml", []),
            "demo, no gold judge": ("configs/demo.yaml", ["evaluate.gold_judge=null"]),
            "length-biased, gold judge": ("configs/demo-length-biased.yaml", []),
            "length-biased, no gold judge": ("configs/demo-length-biased.yaml",
                                             ["evaluate.gold_judge=null"])}


def run(out: Path, config: str, seed: int, overrides: list[str]) -> dict:
    """One pipeline run; returns the JSON summary ``rlhf run`` prints, plus reward metrics."""
    out.mkdir(parents=True, exist_ok=True)
    # The gate's verdict is what is measured here, not the feedback rounds a refusal starts.
    sets = [f"seed={seed}", f"output_dir={out / 'runs'}", "feedback.on_refusal=stop",
            f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *overrides]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", config]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (out / "log.txt").write_text(proc.stdout + proc.stderr)
    start = proc.stdout.find('{\n  "result"')
    if proc.returncode != 0 or start < 0:
        raise RuntimeError(f"{out}: rlhf run exited {proc.returncode}; see {out / 'log.txt'}")
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[start:])
    with sqlite3.connect(out / "mlflow.db") as con:  # the reward stage's metrics
        summary["reward"] = dict(con.execute(
            "select key, value from latest_metrics where key like 'reward/%'").fetchall())
    return summary


def row(name: str, seed: int, s: dict) -> str:
    m, r = s["metrics"], s["reward"]

    def f(key: str, p: int = 3, d: dict = m) -> str:
        return f"{d[key]:.{p}f}" if key in d else "n/a"

    # "FAIL: KL(policy||SFT) 25.578 nats vs ..." -> "KL": the check's name, before its numbers.
    failed = [re.split(r"[:(]|\s[-+]?\d", x[len("FAIL: "):])[0].strip()
              for x in s["reasons"] if x.startswith("FAIL: ")]
    return (f"| {name} | {seed} | {s['result']} | {f('eval/win_rate')} | "
            f"{f('eval/win_rate_rm')} | {f('eval/win_rate_heldout_rm')} | "
            f"{f('eval/gold_policy', 2)} / {f('eval/gold_sft', 2)} | "
            f"{f('eval/len_policy', 1)} / {f('eval/len_sft', 1)} | "
            f"{f('reward/heldout/longer_preferred', 2, r)} | {f('eval/kl_policy_sft', 2)} | "
            f"{f('eval/repetition_policy')} | {'; '.join(failed) or '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gate_hacking"))
    args = parser.parse_args()
    out = Path(args.out)
    jobs = [(name, seed) for seed in args.seeds for name in VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(out / f"{j[0].replace(', ', '-').replace(' ', '_')}"
                                              f"-s{j[1]}", VARIANTS[j[0]][0], j[1],
                                              VARIANTS[j[0]][1]), jobs))
    lines = ["| variant | seed | result | win rate (judge) | win rate, optimised RM | "
             "win rate, held-out RM | gold policy / SFT | tokens policy / SFT | "
             "held-out RM prefers longer | KL | repeated bigrams | failed checks |",
             "|" + "---|" * 12]
    lines += [row(name, seed, s) for (name, seed), s in sorted(zip(jobs, results))]
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
