"""Benchmark: validate 100k preference pairs (plus 300k labels) with the demo tokenizer.

    .venv/bin/python bench/bench_validate.py [--pairs 100000]

Prints the wall seconds of ``run_validation`` (GX import and context build included,
MLflow off) and its CPU seconds (a shared machine inflates wall time; the load average is
recorded too) and writes them to bench/out/bench_validate.json. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_data(out: Path, n_pairs: int, seed: int = 0) -> dict[str, str]:
    from demo.build import all_prompts, make_completion

    rng = random.Random(seed)
    prompts = all_prompts()
    eval_prompts, train = prompts[:64], prompts[64:]
    tones = ["pos", "neg", "neu", "mixed"]
    pairs, labels = [], []
    for i in range(n_pairs):
        a, b = make_completion(rng, rng.choice(tones)), make_completion(rng, rng.choice(tones))
        while b == a:
            b = make_completion(rng, rng.choice(tones))
        pid = f"p{i:07d}"
        pairs.append({"pair_id": pid, "prompt": rng.choice(train), "chosen": a, "rejected": b,
                      "chosen_votes": 3, "num_votes": 3})
        first = rng.random() < 0.5
        for ann in rng.sample(["a0", "a1", "a2", "a3", "a4"], 3):
            pref = "chosen" if rng.random() < 0.9 else "rejected"
            labels.append({"pair_id": pid, "annotator_id": ann, "preferred": pref,
                           "chosen_shown_first": first})
    files = {"preferences": pairs, "preference_labels": labels,
             "eval_prompts": [{"prompt": p} for p in eval_prompts]}
    data = {}
    for name, rows in files.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data[name] = str(path)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), args.pairs)
        t0, c0 = time.perf_counter(), time.process_time()
        from tasks.validation import DataValidationError, ValidationConfig, run_validation

        # Random labels (90% "chosen") agree only by chance; the benchmark measures speed,
        # so agreement is not the point here.
        cfg = ValidationConfig(min_alpha=-1.0)
        try:
            run_validation(cfg, data=data, tokenizer_path=str(ROOT / "demo" / "base_model"),
                              out_dir=tmp, ctx=None)
            passed = True
        except DataValidationError as e:
            passed = False
            print(e)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = {"pairs": args.pairs, "labels": 3 * args.pairs, "seconds": round(seconds, 2),
              "cpu_seconds": round(cpu, 2), "load_avg_1m": os.getloadavg()[0],
              "passed": passed, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count()}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_validate.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"validated {args.pairs} preference pairs + {3 * args.pairs} labels in {seconds:.1f} s"
          f" (passed={passed}; {cpu:.1f} s CPU, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
