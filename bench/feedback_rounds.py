"""Is active selection worth it? Held-out reward-model accuracy against the number of new
labels, pairs chosen by the feedback round's uncertainty selection or at random (issue 9).

    .venv/bin/python bench/feedback_rounds.py            # seeds 0 1 2, new labels 0..256
    .venv/bin/python bench/feedback_rounds.py --seeds 0 --new-labels 0 16 --seed-pairs 16 \
        --pool 64 --sft-model demo/base_model                                      # quick

Everything but the loop is library code:

- **SFT**: the demo's SFT stage (``tasks.sft.run_sft``, ``configs/demo.yaml``), trained once
  (seed 0) and shared: every reward model starts from it (``--sft-model DIR`` reuses one).
- **Seed set**: ``--seed-pairs`` of the demo's 3,000 preference pairs, drawn per seed, with
  their shipped votes (3 simulated annotators each).
- **Pool**: the remaining pairs with their labels dropped and a/b in random order: the
  unlabeled candidates a round may ask about.
- **Rounds**: the new labels grow through ``--new-labels`` (cumulative; 0 32 64 128 256 is
  rounds of 32, 32, 64 and 128). Each round scores the pool (``--candidates N``: a fresh
  random N of it, as a round ranks ``feedback.max_candidates``) with the current reward model
  (seed s; temperature fitted on the eval pairs as the reward stage does: it changes no
  accuracy, only how the margin and disagreement terms weigh against each other) and, for
  ``uncertainty``, with a held-out one (seed s + 1) as ``tasks.reward`` trains it; then
  ``tasks.feedback.choose_pairs`` picks the batch (``uncertainty``: calibrated P(a > b) nearest
  0.5 plus the two models' disagreement; ``random``: seeded random). The batch is written as a
  labeling batch, voted on by ``SimulatedLabeler`` (3 of the demo's 5 simulated annotators on
  the gold judge, the careless a4 among them, ``demo.build.simulated_vote``) and turned into
  pairs by ``labels_to_preferences``. The reward model is then trained again from SFT on the
  seed set plus every new pair so far (``tasks.reward.train_reward_model``: the demo's reward
  settings for ``--epochs`` passes over the data, at least 4 steps of 32 pairs). Epochs, not
  the demo's fixed 120 steps: on a few hundred pairs a fixed step count overfits (128 pairs,
  10 / 20 / 40 steps: 85.3 / 83.8 / 77.8 % gold accuracy, seed 0), which would bury the
  effect of the labels under that of the schedule.
- **Measure**: on the demo's 400 held-out eval pairs, accuracy against the gold judge (the
  pairs where it is not tied) and against the eval file's 5-vote labels (the reward stage's
  ``reward/eval_accuracy``); and how often a round's new majority labels agree with the gold
  judge (uncertain pairs are often near-ties, whose labels are coin flips).

Each seed runs in its own process (``--jobs`` at a time; log in ``<out>/seed<s>.log``). Writes
``<out>/feedback_rounds.json``, ``report.md`` and ``feedback_rounds.png`` (default out:
``bench/out/feedback_rounds``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JUDGE = "demo.judge:sentiment_judge"
STRATEGIES = ("uncertainty", "random")


# --- one seed (its own process) ----------------------------------------------------------

class EvalSet:
    """The held-out eval pairs as token ids, with gold-judge and file labels."""

    def __init__(self, uri: str, tokenizer):
        import torch

        from dataio import explicit_prompts, read_records
        from tasks.evaluate import load_judge
        from tasks.reward import sequence_ids, soft_label

        records = explicit_prompts(read_records(uri), uri)
        self.chosen = [sequence_ids(r, "chosen", tokenizer) for r in records]
        self.rejected = [sequence_ids(r, "rejected", tokenizer) for r in records]
        judge = load_judge(JUDGE)
        g_c = judge([r["chosen"] for r in records])
        g_r = judge([r["rejected"] for r in records])
        self.untied = torch.tensor([a != b for a, b in zip(g_c, g_r)])  # (N,)
        self.gold_chosen = torch.tensor([a > b for a, b in zip(g_c, g_r)])  # (N,)
        self.soft = torch.tensor([soft_label(r) for r in records])  # (N,) vote share of chosen

    def measure(self, model, tokenizer, batch_size: int) -> tuple[dict[str, float], float]:
        """-> (accuracies, temperature fitted as the reward stage fits it)."""
        from models.reward import fit_temperature, preference_accuracy
        from tasks.reward import score_id_lists

        r_c = score_id_lists(model, tokenizer, self.chosen, batch_size)  # (N,)
        r_r = score_id_lists(model, tokenizer, self.rejected, batch_size)
        diffs = r_c - r_r
        gold_ok = ((diffs > 0) == self.gold_chosen)[self.untied]
        acc = {"acc_gold": gold_ok.float().mean().item(),
               "acc_labels": preference_accuracy(r_c, r_r)}
        return acc, fit_temperature(diffs, self.soft.to(diffs.dtype))


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """Both strategies on one seed; they share the seed set, pool and round-0 models."""
    import datasets
    import torch

    from dataio import preference_rows, read_records, write_jsonl_atomic
    from flows.config import load_config
    from models.loading import load_tokenizer
    from models.reward import RewardNorm
    from tasks.evaluate import load_judge
    from tasks.feedback import (FeedbackConfig, SimulatedLabeler, choose_pairs,
                                labels_to_preferences, pair_id, uncertainty_scores)
    from tasks.reward import score_id_lists, sequence_ids, train_reward_model

    t_start = time.perf_counter()
    cfg = load_config(args.config, args.set)
    rcfg = cfg.reward
    heldout_seed = seed + (rcfg.heldout_seed_offset or 1)
    tok = load_tokenizer(args.sft_model)
    evalset = EvalSet(cfg.data.eval_pairs, tok)
    judge = load_judge(JUDGE)

    prefs = read_records(cfg.data.preferences)
    rng = random.Random(seed)
    order = rng.sample(range(len(prefs)), len(prefs))
    seed_rows = [prefs[i] for i in order[:args.seed_pairs]]
    pool, seen = [], set()
    for i in order[args.seed_pairs:args.seed_pairs + args.pool if args.pool else None]:
        p = prefs[i]
        a, b = (p["chosen"], p["rejected"]) if rng.random() < 0.5 else (p["rejected"], p["chosen"])
        pid = pair_id(p["prompt"], a, b)
        if pid not in seen:  # the demo generator repeats a few pairs; the batch refuses twins
            seen.add(pid)
            pool.append({"pair_id": pid, "prompt": p["prompt"], "response_a": a,
                         "response_b": b})
    pool_a = [sequence_ids(r, "response_a", tok) for r in pool]
    pool_b = [sequence_ids(r, "response_b", tok) for r in pool]
    # Gold scores of the pool: diagnostics only (the selection never sees them).
    gold_a = judge([r["response_a"] for r in pool])
    gold_b = judge([r["response_b"] for r in pool])

    def train(rows: list[dict], model_seed: int):
        data = datasets.Dataset.from_list(preference_rows(rows, cfg.data.preferences,
                                                          rcfg.margin))
        steps = max(4, math.ceil(args.epochs * len(rows) / rcfg.per_device_train_batch_size))
        with tempfile.TemporaryDirectory() as scratch:  # no checkpoint outlives one model
            model, *_ = train_reward_model(rcfg.model_copy(update={"max_steps": steps,
                                                                  "save_steps": 0}),
                                           sft_model_uri=args.sft_model, tokenizer=tok,
                                           train=data, seed=model_seed, checkpoints=scratch)
        return model

    def score(model, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (score_id_lists(model, tok, [pool_a[i] for i in idx], rcfg.eval_batch_size),
                score_id_lists(model, tok, [pool_b[i] for i in idx], rcfg.eval_batch_size))

    t0 = time.perf_counter()
    rm0 = train(seed_rows, seed)
    acc0, temp0 = evalset.measure(rm0, tok, rcfg.eval_batch_size)
    ho0 = train(seed_rows, heldout_seed)
    point0 = {"new_labels": 0, "train_pairs": len(seed_rows), **acc0, "temperature": temp0,
              "seconds": time.perf_counter() - t0}
    out: dict = {"seed": seed, "pool": len(pool), "seed_pairs": len(seed_rows)}
    for strategy in STRATEGIES:
        rm, ho, temp = rm0, ho0, temp0
        labeled, remaining, points = list(seed_rows), list(range(len(pool))), [dict(point0)]
        for r, budget in enumerate(args.new_labels[1:], start=1):
            t0 = time.perf_counter()
            k = budget - args.new_labels[r - 1]
            cands = remaining
            if strategy == "uncertainty" and args.candidates:
                # As a round does (feedback.max_candidates): the most uncertain of a fresh random
                # subset, not of everything, which mixes some randomness into the batch.
                cands = sorted(random.Random(1000 * seed + r).sample(
                    remaining, min(args.candidates, len(remaining))))
            s_a, s_b = score(rm, cands)
            scores_a, scores_b = {"rm": s_a}, {"rm": s_b}
            if strategy == "uncertainty":
                scores_a["heldout"], scores_b["heldout"] = score(ho, cands)
            fcfg = FeedbackConfig(selection=strategy, batch_size=k, labeler="simulated",
                                  disagreement_weight=args.disagreement_weight)
            picked, _, _ = choose_pairs(fcfg, RewardNorm(temperature=temp), scores_a, scores_b,
                                        seed=1000 * seed + r)
            # The reward model's own doubt (1 - |2p - 1|) about the picked pairs, both ways.
            p_rm = RewardNorm(temperature=temp).preference_prob(s_a, s_b).tolist()
            doubt = uncertainty_scores([p_rm[j] for j in picked])
            batch = [pool[cands[j]] for j in picked]
            round_dir = Path(args.out) / f"seed{seed}" / strategy / f"round{r}"
            batch_uri = str(round_dir / "batch.jsonl")
            write_jsonl_atomic(batch_uri, batch)
            labels_uri = SimulatedLabeler(JUDGE, fcfg.votes_per_pair,
                                          seed=1000 * seed + r).label(batch_uri)
            new_pairs, _ = labels_to_preferences(batch, read_records(labels_uri))
            by_id = {row["pair_id"]: cands[j] for j, row in zip(picked, batch)}
            gold_agree = []  # does the majority pick the gold judge's pick? (ties left out)
            for pair in new_pairs:
                i = by_id[pair["pair_id"]]
                if gold_a[i] != gold_b[i]:
                    a_chosen = pair["chosen"] == pool[i]["response_a"]
                    gold_agree.append(a_chosen == (gold_a[i] > gold_b[i]))
            gold_gap = [abs(gold_a[i] - gold_b[i]) for i in by_id.values()]
            labeled += new_pairs
            taken = {cands[j] for j in picked}
            remaining = [i for i in remaining if i not in taken]
            rm = train(labeled, seed)
            acc, temp = evalset.measure(rm, tok, rcfg.eval_batch_size)
            if strategy == "uncertainty" and r < len(args.new_labels) - 1:
                ho = train(labeled, heldout_seed)  # the next round's committee member
            points.append({"new_labels": budget, "train_pairs": len(labeled), **acc,
                           "temperature": temp,
                           "new_pairs": len(new_pairs),
                           "new_label_gold_agreement": statistics.fmean(gold_agree or [0.5]),
                           "picked_gold_gap": statistics.fmean(gold_gap),
                           "picked_rm_doubt": statistics.fmean(doubt),
                           "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {strategy} +{budget}: {json.dumps(points[-1])}", flush=True)
        out[strategy] = points
    out["seconds"] = time.perf_counter() - t_start
    return out


# --- the driver --------------------------------------------------------------------------

def train_sft(args: argparse.Namespace) -> str:
    """The demo's SFT stage once (seed 0), tracked in a private MLflow store under ``out``."""
    from mlflow import MlflowClient

    from flows.config import load_config
    from tasks.base import TrackingContext
    from tasks.sft import run_sft

    out = Path(args.out)
    cfg = load_config(args.config, args.set)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("feedback-rounds-bench")
    exp_id = exp.experiment_id if exp else client.create_experiment("feedback-rounds-bench")
    parent = client.create_run(exp_id, run_name="sft").info.run_id
    ctx = TrackingContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent)
    res = run_sft(cfg.sft, base_model=cfg.base_model, data_uri=cfg.data.sft,
                  out_dir=str(out / "sft"), seed=0, ctx=ctx)
    return res.model_uri


def spawn_seed(args: argparse.Namespace, seed: int) -> dict:
    """``run_seed`` in a subprocess (its trainer output in ``<out>/seed<s>.log``)."""
    out = Path(args.out)
    result = out / f"seed{seed}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one-seed", str(seed),
           "--sft-model", args.sft_model, "--out", str(out), "--config", args.config,
           "--seed-pairs", str(args.seed_pairs), "--epochs", str(args.epochs),
           "--disagreement-weight", str(args.disagreement_weight),
           "--new-labels", *map(str, args.new_labels)]
    cmd += ["--pool", str(args.pool)] if args.pool else []
    cmd += ["--candidates", str(args.candidates)] if args.candidates else []
    for s in args.set:
        cmd += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    with open(out / f"seed{seed}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} exited {proc.returncode}; see {out / f'seed{seed}.log'}")
    return json.loads(result.read_text())


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def labels_to_match(target: float, budgets: list[int], curve: list[float]) -> float | None:
    """New labels the (mean) random curve needs to reach ``target``, read off linearly between
    measured budgets; None if it never does within them."""
    for i, acc in enumerate(curve):
        if acc >= target:
            if i == 0:
                return float(budgets[0])
            lo, hi = curve[i - 1], acc
            return budgets[i - 1] + (target - lo) / (hi - lo) * (budgets[i] - budgets[i - 1])
    return None


def summarize(runs: list[dict], budgets: list[int]) -> dict:
    summary: dict = {}
    for strategy in STRATEGIES:
        rows = []
        for j, b in enumerate(budgets):
            pts = [run[strategy][j] for run in runs]
            row = {"new_labels": b}
            for key in ("acc_gold", "acc_labels", "new_label_gold_agreement", "picked_gold_gap",
                        "picked_rm_doubt"):
                if key in pts[0]:
                    row[key], row[key + "_sd"] = mean_sd([p[key] for p in pts])
            row["acc_gold_per_seed"] = [p["acc_gold"] for p in pts]
            rows.append(row)
        summary[strategy] = rows
    rnd = [r["acc_gold"] for r in summary["random"]]
    summary["random_labels_to_match_uncertainty"] = {
        str(b): labels_to_match(r["acc_gold"], budgets, rnd)
        for b, r in zip(budgets, summary["uncertainty"]) if b > 0}
    summary["paired_gain_gold"] = {  # uncertainty - random, same seed, same seed set
        str(b): mean_sd([run["uncertainty"][j]["acc_gold"] - run["random"][j]["acc_gold"]
                         for run in runs]) for j, b in enumerate(budgets)}
    return summary


def report_md(summary: dict, budgets: list[int]) -> str:
    def cell(row: dict, key: str, scale: float = 100.0, p: int = 1) -> str:
        if key not in row:
            return "-"
        return f"{scale * row[key]:.{p}f} ± {scale * row[key + '_sd']:.{p}f}"

    lines = ["| new labels | RM acc. vs gold, uncertainty % | RM acc. vs gold, random % | "
             "paired gain (pts) | acc. vs eval labels, uncertainty % | acc. vs eval labels, "
             "random % | new labels agreeing with gold, unc. / rand. % | gold gap of picked "
             "pairs, unc. / rand. | random needs (labels) |", "|" + "---|" * 9]
    for j, b in enumerate(budgets):
        u, r = summary["uncertainty"][j], summary["random"][j]
        gain, gain_sd = summary["paired_gain_gold"][str(b)]
        need = summary["random_labels_to_match_uncertainty"].get(str(b))
        need_s = "-" if b == 0 else (f"{need:.0f}" if need is not None else f"> {budgets[-1]}")
        agree = ("-" if b == 0 else f"{cell(u, 'new_label_gold_agreement', p=0)} / "
                 f"{cell(r, 'new_label_gold_agreement', p=0)}")
        gap = ("-" if b == 0 else f"{cell(u, 'picked_gold_gap', 1.0, 2)} / "
               f"{cell(r, 'picked_gold_gap', 1.0, 2)}")
        lines.append(f"| {b} | {cell(u, 'acc_gold')} | {cell(r, 'acc_gold')} | "
                     f"{100 * gain:+.1f} ± {100 * gain_sd:.1f} | {cell(u, 'acc_labels')} | "
                     f"{cell(r, 'acc_labels')} | {agree} | {gap} | {need_s} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], summary: dict, budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"uncertainty": "tab:red", "random": "tab:blue"}
    for ax, key, title in ((axes[0], "acc_gold", "vs gold judge"),
                           (axes[1], "acc_labels", "vs eval file's 5-vote labels")):
        for strategy in STRATEGIES:
            for run in runs:  # per seed, thin
                ax.plot(budgets, [100 * p[key] for p in run[strategy]], color=colors[strategy],
                        alpha=0.25, lw=1)
            rows = summary[strategy]
            ax.errorbar(budgets, [100 * r[key] for r in rows],
                        yerr=[100 * r[key + "_sd"] for r in rows], color=colors[strategy],
                        lw=2, marker="o", capsize=3, label=f"{strategy} (mean ± sd)")
        ax.set_xscale("symlog", linthresh=32)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("new labeled pairs")
        ax.set_ylabel("held-out reward-model accuracy %")
        ax.set_title(f"accuracy {title}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Active selection on the demo: {len(runs)} seeds, seed set "
                 f"{runs[0]['seed_pairs']} pairs, pool {runs[0]['pool']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--new-labels", type=int, nargs="+", default=[0, 32, 64, 128, 256],
                        help="cumulative new labeled pairs after each round; starts at 0")
    parser.add_argument("--seed-pairs", type=int, default=64,
                        help="labeled pairs the first reward model trains on")
    parser.add_argument("--pool", type=int, default=None,
                        help="unlabeled candidate pairs (default: all the seed set leaves)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="uncertainty picks among this many random pool pairs per round "
                             "(feedback.max_candidates; default: the whole pool)")
    parser.add_argument("--epochs", type=float, default=2.0,
                        help="passes over the labeled pairs per reward-model training")
    parser.add_argument("--disagreement-weight", type=float, default=1.0,
                        help="feedback.disagreement_weight of the uncertainty selection")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for rlhf run")
    parser.add_argument("--sft-model", default=None,
                        help="an SFT model directory to reuse (default: train the demo's once)")
    parser.add_argument("--jobs", type=int, default=2, help="seeds run at a time")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "feedback_rounds"))
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_labels[0] != 0 or args.new_labels != sorted(set(args.new_labels)):
        parser.error("--new-labels must start at 0 and increase")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one_seed is not None:
        result = run_seed(args, args.one_seed)
        (out / f"seed{args.one_seed}.json").write_text(json.dumps(result, indent=2))
        return

    t0 = time.perf_counter()
    sft_seconds = 0.0
    if args.sft_model is None:
        args.sft_model = train_sft(args)
        sft_seconds = time.perf_counter() - t0
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda s: spawn_seed(args, s), args.seeds))
    summary = summarize(runs, args.new_labels)
    wall = time.perf_counter() - t0
    load = os.getloadavg()
    # CPU seconds of this process and the seed processes: on a shared machine, the cost that
    # does not depend on how busy the others keep the cores.
    cpu = sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")
              for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    result = {"settings": {k: v for k, v in vars(args).items() if k != "one_seed"},
              "wall_seconds": wall, "cpu_seconds": cpu, "sft_seconds": sft_seconds,
              "load_average_at_end": load, "cpus": os.cpu_count(),
              "summary": summary, "runs": runs}
    (out / "feedback_rounds.json").write_text(json.dumps(result, indent=2))
    report = report_md(summary, args.new_labels)
    report += (f"\n{len(runs)} seeds; wall {wall / 60:.1f} min (SFT {sft_seconds:.0f} s), "
               f"CPU {cpu:.0f} s, {os.cpu_count()} CPUs, load average at the end "
               f"{load[0]:.1f}\n")
    (out / "report.md").write_text(report)
    plot(runs, summary, args.new_labels, out / "feedback_rounds.png")
    print(report)


if __name__ == "__main__":
    main()
