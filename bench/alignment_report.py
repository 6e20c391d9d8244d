"""Alignment outcome report: PPO, DPO, GRPO and RLOO on the demo task over several seeds.

    .venv/bin/python bench/alignment_report.py                       # 3 seeds, 4 algorithms
    .venv/bin/python bench/alignment_report.py --seeds 0 --algorithms ppo dpo

Per seed, SFT and the reward model are trained once (default configs, `configs/demo.yaml`)
and shared by every algorithm, so the algorithms differ only in the policy stage. Each
policy is evaluated by the pipeline's own evaluate stage: gold-judge win rate vs SFT on the
held-out prompts and KL(policy || SFT) per sequence. Writes
``bench/out/alignment/report.json``, ``report.md`` and ``gold_vs_kl.png`` (gold reward against
KL, the over-optimisation picture of Gao et al. 2022, https://arxiv.org/abs/2210.10760).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

OUT = Path("bench/out/alignment")


def run_seed(seed: int, algorithms: list[str], overrides: list[str], out: Path) -> list[dict]:
    from mlflow import MlflowClient

    from flows.config import load_config
    from tasks.base import TrackingContext
    from tasks.evaluate import run_evaluate
    from tasks.policy import run_policy
    from tasks.reward import run_reward
    from tasks.sft import run_sft

    cfg = load_config("configs/demo.yaml", [f"seed={seed}", *overrides])
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("alignment-report")
    exp_id = exp.experiment_id if exp else client.create_experiment("alignment-report")
    parent = client.create_run(exp_id, run_name=f"seed-{seed}").info.run_id
    ctx = TrackingContext(tracking_uri=uri, experiment_id=exp_id, parent_run_id=parent)
    root = out / f"seed{seed}"
    d = cfg.data
    sft = run_sft(cfg.sft, base_model=cfg.base_model, data_uri=d.sft, out_dir=str(root / "sft"),
                  seed=seed, ctx=ctx)
    rm = run_reward(cfg.reward, sft_model_uri=sft.model_uri, train_uri=d.preferences,
                    eval_uri=d.eval_pairs, rl_prompts_uri=d.rl_prompts,
                    out_dir=str(root / "reward"), seed=seed, ctx=ctx)
    rows = []
    for algo in algorithms:
        cfg.policy.algorithm = algo
        t0 = time.perf_counter()
        pol = run_policy(cfg.policy, sft_model_uri=sft.model_uri, reward_model_uri=rm.model_uri,
                         prompts_uri=d.rl_prompts, preferences_uri=d.preferences,
                         out_dir=str(root / algo), seed=seed, ctx=ctx)
        seconds = time.perf_counter() - t0
        ev = run_evaluate(cfg.evaluate, policy_uri=pol.model_uri, sft_model_uri=sft.model_uri,
                          reward_model_uri=rm.model_uri, heldout_reward_uri=rm.heldout_model_uri,
                          heldout_sft_uri=sft.heldout_uri, eval_prompts_uri=d.eval_prompts,
                          seed=seed, ctx=ctx)
        m = ev.metrics
        rows.append({"seed": seed, "algorithm": algo, "policy_seconds": seconds,
                     "win_rate": m["eval/win_rate"], "kl": m["eval/kl_policy_sft"],
                     "gold_policy": m["eval/gold_policy"], "gold_sft": m["eval/gold_sft"],
                     "rm_policy": m["eval/rm_policy"], "len_policy": m["eval/len_policy"],
                     "rm_accuracy": rm.metrics.get("reward/eval_accuracy"),
                     "stop_reason": pol.stop_reason})
        print(json.dumps(rows[-1]), flush=True)
    client.set_terminated(parent, "FINISHED")
    return rows


def summarise(rows: list[dict], algorithms: list[str]) -> str:
    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    lines = ["| algorithm | seeds | win rate vs SFT (gold) | KL(policy‖SFT) nats | gold policy | gold SFT | policy stage s |",
             "|---|---|---|---|---|---|---|"]
    for algo in algorithms:
        r = [x for x in rows if x["algorithm"] == algo]
        if not r:
            continue
        lines.append(f"| {algo} | {len(r)} | {ms([x['win_rate'] for x in r])} | {ms([x['kl'] for x in r])} "
                     f"| {ms([x['gold_policy'] for x in r])} | {ms([x['gold_sft'] for x in r])} "
                     f"| {ms([x['policy_seconds'] for x in r])} |")
    lines += ["", "Per seed:", "", "| seed | algorithm | win rate | KL | gold policy | gold SFT |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {x['seed']} | {x['algorithm']} | {x['win_rate']:.3f} | {x['kl']:.2f} "
              f"| {x['gold_policy']:.3f} | {x['gold_sft']:.3f} |" for x in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in sorted({r["algorithm"] for r in rows}):
        r = [x for x in rows if x["algorithm"] == algo]
        ax.scatter([x["kl"] for x in r], [x["gold_policy"] for x in r], label=algo)
    sft = [x["gold_sft"] for x in rows]
    ax.scatter([0.0], [statistics.mean(sft)], marker="x", color="black", label="SFT")
    ax.set_xlabel("KL(policy || SFT) per sequence, nats")
    ax.set_ylabel("gold-judge score (held-out prompts)")
    ax.set_title("Gold reward vs KL on the demo task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algorithms", nargs="+", default=["ppo", "dpo", "grpo", "rloo"])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override applied to every run (stage.field=value)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    results = args.out / "report.json"
    for seed in args.seeds:
        rows += run_seed(seed, args.algorithms, args.overrides, args.out)
        results.write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2))
    table = summarise(rows, args.algorithms)
    (args.out / "report.md").write_text(table + "\n")
    plot(rows, args.out / "gold_vs_kl.png")
    print(table)


if __name__ == "__main__":
    main()
