"""PPO at GPU scale in one lease: ours vs trl 1.12 at ~100 M and ~1.2 B, and a 7 B LoRA run.

    bench/device/run.sh                        # on the GPU machine (installs carried wheels)
    python bench/device/bench_gpu.py --device cpu --sizes tiny --sides ours --lora tiny \\
        --response-length 8 --out /tmp/x       # the CPU smoke run the tests do

Each run is a subprocess of ``bench/bench_ppo.py``'s workers on its matched settings (GPT-2
built from config with the demo tokenizer; reward model = its backbone with a fresh head),
one run per (size, side, precision, decode), in priority order so that a lease cut short still
has what issue 12 asks for first: ours and trl at every size in the first precision (bf16),
ours with the static-cache decode at every size (it compiles: a minute or so each), the 7 B
LoRA runs (``--lora-decodes``, in order), then the other precisions' pairs (TF32).
After every run ``bench_gpu.json`` and ``bench_gpu.md`` are rewritten in ``--out``.

For ours it also reports, per phase (generation, scoring = reference/critic/reward forwards,
update), achieved TFLOP/s and MFU against the device's dense peak (bf16, or TF32 for fp32
runs), counted as ``bench/device/mfu.py`` says, over the updates after the first (which
carries warm-up and compilation); and sampled tokens/s against the decode bound (every policy
weight read once per step at the device's HBM bandwidth).

``--probes profile,warmup`` runs diagnostics of ours instead (what the last lease left
unexplained): the profile runs ``bench/profile_ppo.py`` on a size's settings per
``--profile-variants`` (eager, then ``compile_update``) and reads the GPU kernels of one
update's PPO phase, launches and idle time (the 1.2 B update ran at 20 % MFU, and looks
bound by the host: bench/README.md); the warm-up probe times three updates of a bf16 run per
``--warmup-variants`` (one suspect of the first update's extra 16-20 s taken away each) with
the CUDA allocator's counts per update, and the static decode twice (a cold, then a warm
compile cache). ``--variant`` runs ours' comparison runs with one of ``VARIANTS``.

``--jobs FILE`` runs the runs a JSON file lists instead, in its order: a size and side each,
and where wanted a decode (``DECODES``; ours default to graphs, the trainer's choice on a
GPU, trl's decode is its own), a variant (``VARIANTS`` names joined by '+'), batch or
episodes, all checked before the first run. ``bench/device/jobs/`` holds the next lease's;
the leases' own are kept with their results in ``bench/device/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(HERE))

import bench_ppo  # noqa: E402
import mfu  # noqa: E402

# Workers this script runs beside bench_ppo's two sides (same SETTINGS RESULT interface).
bench_ppo.WORKERS.update({"ours-lora": HERE / "lora_worker.py",
                          "profile": ROOT / "bench/profile_ppo.py"})

# GPT-2 overrides per size; batch as in issue 12's table. "tiny" is demo/base_model (0.5 M,
# 64 positions). n_positions 1024 as in GPT-2 itself: demo/base_model's 64 cannot hold a
# 32-token prompt and a 128-token response (the first GPU run died on that index).
SIZES = {
    "tiny": {"config": None, "batch": 16, "episodes": 32},
    "100m": {"config": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
             "batch": 128, "episodes": 512},
    "1.2b": {"config": {"n_layer": 24, "n_embd": 2048, "n_head": 16, "n_positions": 1024},
             "batch": 64, "episodes": 256},
}
# LoRA runs: a Qwen2-7B-shaped decoder (7.6 B with its own 152k vocabulary; with the demo
# tokenizer's small vocabulary the bases are ~6.5 B each), or a tiny one for CPU.
LORA = {
    "7b": {"arch": "qwen2", "batch": 32, "episodes": 96, "arch_config": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 4096}},
    "tiny": {"arch": "qwen2", "batch": 8, "episodes": 16, "arch_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}},
}

# Settings of ours changed against the trainer's defaults, by name: for the probes and
# ``--variant``. The warm-up probe (``--probes warmup``): the first update of a bf16 run on an
# H100 took 16-20 s more than the next ones, nearly all in sampling, and more again in the
# update phase after a dynamic-cache decode (bench/README.md); each of its variants changes one
# suspect. The profile (``--probes profile``) compares the eager update with the compiled one.
VARIANTS = {
    # The trainer's defaults (cuDNN's attention kernel allowed, PPOConfig.cudnn_attention).
    "default": {},
    # cuDNN's attention left out: flash, memory-efficient or math attention. cuDNN builds an
    # execution plan the first time it sees a shape; on an H100 (1.2 B, batch 64) the first
    # update took 18 s without it against 39 s with it, the steady updates 4.5 s against 3.3 s
    # (bench/README.md, 2026-11-26 runs 3 and 4).
    "no-cudnn-attention": {"cudnn_attention": False},
    # The caching allocator grows by cudaMalloc'd segments; a KV cache grown by concatenation
    # leaves odd-sized blocks, and the update's larger tensors may miss them, free the cache
    # and retry (the worker logs cudaMalloc calls and retries per update).
    "expandable-segments": {"env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}},
    # The update's forwards and backwards compiled (PPOConfig.compile_update): an eager 1.2 B
    # mini-batch step issues ~5,900 ops, and took about as long as that many ops take a host.
    "compile-update": {"compile_update": True},
    # A mini-batch that runs out of GPU memory is redone in smaller micro-batches
    # (PPOConfig.auto_micro_batch): for batches whose size was not chosen from memory.
    "auto-micro-batch": {"auto_micro_batch": True},
    # Exact token widths in the scoring and update forwards (PPOConfig.width_multiple 1), not
    # the default buckets of 16: every new width then costs cuDNN a plan (an H200 run whose
    # responses shrank to new widths took 6.6-6.7 s update phases against 2.5-2.8 s: run 6).
    "exact-widths": {"width_multiple": 1},
}
# PPOConfig.decode_cache values a job may name ("auto" is decided per device: name it).
DECODES = ("dynamic", "static", "graphs")
WARMUP_VARIANTS = ("default", "no-cudnn-attention", "expandable-segments")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="100m,1.2b", help=f"comma-separated of {', '.join(SIZES)}")
    p.add_argument("--sides", default="ours,trl112")
    p.add_argument("--precisions", default="bf16,no", help="mixed_precision values to run")
    p.add_argument("--static-decode", action="store_true", default=True,
                   help="also run ours bf16 with decode_cache=static (the default)")
    p.add_argument("--no-static-decode", dest="static_decode", action="store_false")
    p.add_argument("--lora", default="7b", help=f"LoRA run: {', '.join(LORA)} or none")
    p.add_argument("--lora-decodes", default="dynamic,static",
                   help="decode caches of the LoRA runs, in order")
    p.add_argument("--response-length", type=int, default=128)
    p.add_argument("--episodes", type=int, default=None, help="override every size's episodes")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=400,
                   help="start no new run after this many seconds: the device tool stops a "
                        "command at 600 s, and a 1.2 B run with loading takes 1-2 minutes")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="kill a run still going this many seconds after the start, so the "
                        "script ends (and packs its logs) before the device tool's limit")
    p.add_argument("--probes", default="",
                   help="instead of the comparison, diagnostic runs of ours: 'warmup' (at "
                        "--sizes: a bf16 dynamic-decode run per --warmup-variants, then the "
                        "static decode twice, with a cold and a warm compile cache) and/or "
                        "'profile' (at --profile-sizes: bench/profile_ppo.py, GPU kernels of "
                        "one update's PPO phase); 3 updates per warm-up run")
    p.add_argument("--warmup-variants", default=",".join(WARMUP_VARIANTS),
                   help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--profile-sizes", default="1.2b")
    p.add_argument("--profile-variants", default="default,compile-update",
                   help=f"of {', '.join(VARIANTS)}, a profile each, in order")
    p.add_argument("--variant", default=None,
                   help=f"ours' GPT-2 comparison runs (not LoRA's) with one of {', '.join(VARIANTS)}"
                        " (several joined by '+')")
    p.add_argument("--jobs", default=None,
                   help="a JSON file listing the runs instead of the plan, in order: objects "
                        "with size and side, and optional precision (bf16), decode (static for "
                        "ours, dynamic for trl), variant ('+'-joined VARIANTS), batch, episodes")
    p.add_argument("--job-timeout-s", type=float, default=None,
                   help="kill one run after this many seconds (a compile that runs away)")
    p.add_argument("--profile-decode", default="static",
                   help="decode cache of the profiled run (auto: what the trainer picks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench/out/device"))
    p.add_argument("--runs-dir", default=None, help="per-run logs and results (default OUT/runs)")
    return p.parse_args()


def settings_for(args, size: dict, policy_dir: str, rm_dir: str, precision: str,
                 decode: str) -> dict:
    ns = argparse.Namespace(
        prompts=str(ROOT / "demo/data/rl_prompts.jsonl"), episodes=args.episodes or size["episodes"],
        batch_size=size["batch"], mini_batches=4, response_length=args.response_length,
        ppo_epochs=4, learning_rate=1e-5, seed=args.seed, threads=args.threads, device=args.device)
    return {**bench_ppo.settings(ns, policy_dir, rm_dir), "mixed_precision": precision,
            "decode_cache": decode, "tf32": True}


def probe_plan(args) -> list[dict]:
    """The diagnostic jobs of ``--probes`` (see its help), in the order given: the lease's
    budget drops the last ones first."""
    jobs = []
    for probe in (p for p in args.probes.split(",") if p):
        if probe == "warmup":
            variants = variant_names(args.warmup_variants)
            for size in (x for x in args.sizes.split(",") if x):
                jobs += [{"kind": "pair", "size": size, "side": "ours", "precision": "bf16",
                          "decode": "dynamic", "variant": v, "probe": "warmup"} for v in variants]
                # the second run finds the first one's compiled graphs in inductor's cache
                jobs += [{"kind": "pair", "size": size, "side": "ours", "precision": "bf16",
                          "decode": "static", "variant": v, "probe": "warmup"}
                         for v in ("cold", "warm")]
        elif probe == "profile":
            jobs += [{"kind": "profile", "size": size, "side": "profile", "precision": "bf16",
                      "decode": args.profile_decode, "variant": v}
                     for size in args.profile_sizes.split(",") if size
                     for v in variant_names(args.profile_variants)]
        else:
            raise SystemExit(f"bench_gpu: unknown probe {probe!r}: warmup or profile")
    return jobs


def variant_names(names: str) -> list[str]:
    """Comma-separated ``VARIANTS`` names (each may join several with '+'), checked."""
    out = [v for v in names.split(",") if v]
    unknown = [part for v in out for part in v.split("+") if part not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_gpu: unknown variant {unknown[0]!r}: {', '.join(VARIANTS)}")
    return out


def variant_settings(name: str) -> dict:
    """The settings of a '+'-joined variant name; the static-decode probe's labels ("cold",
    "warm") change nothing."""
    out: dict = {}
    for part in name.split("+"):
        out.update(VARIANTS.get(part, {}))
    return out


def explicit_plan(path: str) -> list[dict]:
    """``--jobs``: runs listed by hand, each checked before any runs (a typo found minutes
    into a lease costs the lease)."""
    try:
        listed = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench_gpu: --jobs {path}: {e}") from None
    jobs = []
    for i, d in enumerate(listed if isinstance(listed, list) else [None]):
        where = f"bench_gpu: --jobs {path}, entry {i + 1}"
        if not isinstance(d, dict) or d.get("size") not in SIZES or d.get("side") not in ("ours", "trl112"):
            raise SystemExit(f"{where}: needs a size ({', '.join(SIZES)}) and a side "
                             f"(ours, trl112), got {d!r}")
        extra = set(d) - {"size", "side", "precision", "decode", "variant", "batch", "episodes"}
        if extra:
            raise SystemExit(f"{where}: unknown keys {sorted(extra)}")
        if d.get("variant") and d["side"] != "ours":
            raise SystemExit(f"{where}: variants change ours' settings, not {d['side']}'s")
        if d.get("decode", "dynamic") not in DECODES:
            raise SystemExit(f"{where}: decode must be one of {', '.join(DECODES)}, "
                             f"got {d['decode']!r}")
        variant_names(d.get("variant", ""))
        jobs.append({"kind": "pair", "precision": "bf16",
                     "decode": "graphs" if d["side"] == "ours" else "dynamic", **d})
    return jobs


def check_positions(args, sizes) -> None:
    """A prompt and response longer than the model's positions fail on a GPU as a device-side
    assert deep in the embedding lookup, minutes into the lease: refuse them before any run."""
    from transformers import AutoConfig

    need = bench_ppo.MAX_PROMPT_LENGTH + args.response_length
    base = AutoConfig.from_pretrained(ROOT / "demo/base_model").n_positions
    for name in sizes:
        limit = (SIZES[name]["config"] or {}).get("n_positions", base)
        if need > limit:
            raise SystemExit(f"bench_gpu: size {name} has {limit} positions, but a prompt of "
                             f"{bench_ppo.MAX_PROMPT_LENGTH} and a response of "
                             f"{args.response_length} tokens need {need}: lower "
                             f"--response-length or pick a larger size")


def plan(args) -> list[dict]:
    """Jobs in priority order (see the module docstring), or the probes' jobs."""
    if args.probes:
        return probe_plan(args)
    if args.jobs:
        return explicit_plan(args.jobs)
    variant_names(args.variant or "")  # refused before any run, not after the first ones
    sizes = [s for s in args.sizes.split(",") if s]
    sides = [s for s in args.sides.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]

    def runs(size, precs):
        return [{"kind": "pair", "size": size, "side": side, "precision": p, "decode": "dynamic"}
                for p in precs for side in sides]

    def static(size):  # compiles on a GPU (minutes, maybe): after the comparisons
        if args.static_decode and "ours" in sides and "bf16" in precisions:
            return [{"kind": "pair", "size": size, "side": "ours", "precision": "bf16",
                     "decode": "static"}]
        return []

    first = [job for size in sizes for job in runs(size, precisions[:1])]
    later = [job for size in sizes for job in static(size)]
    lora = [] if args.lora == "none" else [
        {"kind": "lora", "size": args.lora, "side": "ours-lora", "precision": "bf16",
         "decode": d} for d in args.lora_decodes.split(",")
        if d and (d != "static" or args.static_decode)]
    rest = [job for size in sizes for job in runs(size, precisions[1:])]
    return first + later + lora + rest


def counts_for(policy_dir: str, precision: str) -> mfu.ModelCounts:
    """Matmul parameters of the GPT-2 at ``policy_dir``; critic and reward model share its
    backbone shape (bench_ppo.prepare_models builds them from it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy_dir))
    trunk, head = mfu.matmul_params(model)
    return mfu.ModelCounts(trunk, head, trunk, trunk, head_bytes=2 if precision == "bf16" else 4)


def analyse(result: dict, counts: mfu.ModelCounts, device_name: str, lora: bool) -> dict:
    """Per-phase TFLOP/s and MFU over the steady updates, and decode tokens/s vs its bound."""
    perf = result.get("perf_updates") or []
    steady = perf[1:] if len(perf) > 1 else perf
    if not steady:
        return {}
    key = mfu.device_key(device_name)
    peak = mfu.PEAK_FLOPS[key]["bf16" if result["mixed_precision"] == "bf16" else "tf32"] if key else None
    flops = {"generation": 0.0, "scoring": 0.0, "update": 0.0}
    secs = {"generation": 0.0, "scoring": 0.0, "update": 0.0}
    gen_tokens = 0
    shapes = [mfu.UpdateShape(result_batch(result), int(u["prompt_width"]),
                              int(u["response_width"]), 4) for u in perf]
    u_flops = [mfu.phase_flops(counts, shape, lora=lora) for shape in shapes]
    # every update's phases, the first too: a collapse to short responses shows
    per_update = [mfu.utilisation(f, {k: u[f"{k}_s"] for k in secs}, peak)
                  for u, f in zip(perf, u_flops)]
    first = len(perf) - len(steady)
    for u, shape, f in zip(steady, shapes[first:], u_flops[first:]):
        for k, v in f.items():
            flops[k] += v
        for k in secs:
            secs[k] += u[f"{k}_s"]
        gen_tokens += shape.batch * shape.response
    out = {"phases": mfu.utilisation(flops, secs, peak), "per_update": per_update,
           "peak_tflops": peak / 1e12 if peak else None,
           "phase_seconds": secs, "steady_updates": len(steady),
           "generation_tokens_per_s": gen_tokens / secs["generation"] if secs["generation"] else None}
    if key:
        bound = mfu.decode_bound_tokens_per_s(counts, result_batch(result), mfu.PEAK_BANDWIDTH[key])
        out["decode_bound_tokens_per_s"] = bound
        out["decode_share_of_bound"] = (out["generation_tokens_per_s"] or 0) / bound
    return out


def result_batch(result: dict) -> int:
    return result["batch_size"]


def run_job(args, job: dict, models: dict, run_dir: Path, device_name: str,
            timeout: float | None = None) -> dict:
    tag = f"{job['size']}_{job['side']}_{job['precision']}_{job['decode']}" + (
        f"_{job['variant']}" if job.get("variant") else "")
    if job["kind"] == "profile":
        size = SIZES[job["size"]]
        s = settings_for(args, size, *models[job["size"]], job["precision"], job["decode"])
        s.update(variant_settings(job["variant"]), profile_updates=2)
        r = bench_ppo.run_worker("profile", sys.executable, s, run_dir, tag, timeout)
        r.update(job=job, tag=tag)
        return r
    if job["kind"] == "lora":
        spec = LORA[job["size"]]
        s = settings_for(args, {"batch": spec["batch"], "episodes": spec["episodes"]}, "", "",
                         job["precision"], job["decode"])
        s.update(arch=spec["arch"], arch_config=spec["arch_config"], lora_r=16,
                 total_episodes=args.episodes or spec["episodes"])
        r = bench_ppo.run_worker("ours-lora", sys.executable, s, run_dir, tag, timeout)
        r["batch_size"] = s["batch_size"]
        counts = mfu.ModelCounts(**r["counts"], head_bytes=2) if "counts" in r else None
    else:
        size = {**SIZES[job["size"]], **{k: job[k] for k in ("batch", "episodes") if k in job}}
        policy_dir, rm_dir = models[job["size"]]
        s = settings_for(args, size, policy_dir, rm_dir, job["precision"], job["decode"])
        if job.get("variant"):
            s.update(variant_settings(job["variant"]))
        elif job["side"] == "ours" and args.variant:
            s.update(variant_settings(args.variant))
        if job.get("probe") == "warmup":  # three updates, one suspect taken away
            s["total_episodes"] = args.episodes or 3 * s["batch_size"]
        r = bench_ppo.run_worker(job["side"], sys.executable, s, run_dir, tag, timeout)
        r["batch_size"] = s["batch_size"]
        counts = counts_for(policy_dir, job["precision"]) if job["side"] == "ours" else None
    r.update(job=job, tag=tag)
    if counts is not None:
        r["analysis"] = analyse(r, counts, device_name, lora=job["kind"] == "lora")
    return r


def table(runs: list[dict]) -> str:
    rows = ["| size | side | precision | decode | batch | episodes/s | steady ep/s | vs trl (whole "
            "/ steady) | first update s | peak CUDA GB | MFU gen / score / update | gen tok/s (bound) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # trl's run at the same size, precision and batch (another batch is another workload)
    trl = {(r["job"]["size"], r["job"]["precision"], r["batch_size"]): r
           for r in runs if r["job"]["side"] == "trl112"}
    for r in runs:
        j, st = r["job"], r.get("steady_state") or {}
        ratio = ""
        peer = trl.get((j["size"], j["precision"], r["batch_size"]))
        if j["side"] == "ours" and peer and peer.get("steady_state") and st:
            ratio = (f"x{r['episodes_per_s'] / peer['episodes_per_s']:.2f} / "
                     f"x{st['episodes_per_s'] / peer['steady_state']['episodes_per_s']:.2f}")
        a = r.get("analysis") or {}
        ph = a.get("phases") or {}
        gen = a.get("generation_tokens_per_s")
        bound = a.get("decode_bound_tokens_per_s")
        gen_s = (f"{gen:.0f}" + (f" ({bound:.0f})" if bound else "")) if gen else "-"
        cuda = r.get("cuda_max_memory_allocated_mb")
        decode = j["decode"] + (f" ({j['variant']})" if j.get("variant") else "")
        rows.append(
            f"| {j['size']} | {j['side']} | {j['precision']} | {decode} | {r['batch_size']} | "
            f"{r['episodes_per_s']:.2f} | {st.get('episodes_per_s', float('nan')):.2f} | {ratio} | "
            f"{r['first_update_s']:.1f} | {f'{cuda / 1024:.1f}' if cuda else '-'} | "
            f"{phase_cells(ph)} | {gen_s} |")
    return "\n".join(rows)


def phase_cells(phases: dict) -> str:
    """Generation / scoring / update utilisation: MFU, or TFLOP/s where no peak is known (CPU)."""
    def cell(k):
        if k not in phases:
            return "-"
        m = phases[k]["mfu"]
        return f"{100 * m:.1f}%" if m is not None else f"{phases[k]['tflops']:.3f} TF/s"

    return " / ".join(cell(k) for k in ("generation", "scoring", "update"))


def warmup_table(runs: list[dict]) -> str:
    """The warm-up probe's runs: each update's phases, and what the CUDA allocator did."""
    rows = ["| run | update | generation s | scoring s | update s | cudaMalloc calls | "
            "cudaFree calls | alloc retries |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for i, u in enumerate(r.get("perf_updates") or [], 1):
            rows.append(f"| {r['tag']} | {i} | {u['generation_s']:.2f} | {u['scoring_s']:.2f} | "
                        f"{u['update_s']:.2f} | {u.get('cuda_num_device_alloc', '-')} | "
                        f"{u.get('cuda_num_device_free', '-')} | "
                        f"{u.get('cuda_num_alloc_retries', '-')} |")
    return "\n".join(rows)


def per_update_table(runs: list[dict]) -> str:
    """Ours' runs: each update's response width and phase utilisation (the steady columns of
    ``table`` average them; a policy that learns to stop early shrinks the later updates)."""
    rows = ["| run | update | response width | gen / score / update |", "|---|---|---|---|"]
    for r in runs:
        for i, (u, ph) in enumerate(zip(r.get("perf_updates") or [],
                                        (r.get("analysis") or {}).get("per_update", [])), 1):
            rows.append(f"| {r['tag']} | {i} | {int(u['response_width'])} | {phase_cells(ph)} |")
    return "\n".join(rows)


def write_report(out: Path, report: dict) -> str:
    """``bench_gpu.json`` and ``bench_gpu.md`` as they stand (rewritten after every job, so a
    lease cut short keeps what ran). Returns the markdown."""
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    md = table(report["runs"])
    if any((r.get("analysis") or {}).get("per_update") for r in report["runs"]):
        md += f"\n\nPer update, utilisation by phase:\n\n{per_update_table(report['runs'])}"
    probes = [r for r in report["runs"] if r["job"].get("probe")]
    if probes:
        md += f"\n\nWarm-up probe, per update:\n\n{warmup_table(probes)}"
    for p in report.get("profiles", []):
        md += f"\n\nProfile `{p['tag']}`:\n\n{p['table']}"
    (out / "bench_gpu.md").write_text(f"`{report['command']}` on {report['device']['name']}"
                                      f"\n\n{md}\n")
    return md


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        info.update(name=torch.cuda.get_device_name(), memory_gb=round(
            torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info["name"] = "cpu"
    return info


def main() -> None:
    args = parse_args()
    t_start = time.monotonic()
    out = Path(args.out)
    run_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    jobs = plan(args)
    check_positions(args, dict.fromkeys(j["size"] for j in jobs if j["kind"] != "lora"))
    dev = device_info(args.device)
    report = {"command": " ".join(["python", "bench/device/bench_gpu.py", *sys.argv[1:]]),
              "device": dev, "plan": jobs, "runs": [], "skipped": [], "failed": [],
              "flops_convention": mfu.__doc__}
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        models: dict[str, tuple[str, str]] = {}
        for job in jobs:
            elapsed = time.monotonic() - t_start
            if elapsed > args.budget_s or (args.deadline_s is not None
                                           and args.deadline_s - elapsed < 10):
                report["skipped"].append(job)
                continue
            if job["kind"] in ("pair", "profile") and job["size"] not in models:
                cfg = SIZES[job["size"]]["config"]
                d = Path(tmp) / job["size"]
                d.mkdir()
                models[job["size"]] = bench_ppo.prepare_models(
                    d, json.dumps(cfg) if cfg else None, args.seed)
            t0 = time.monotonic()
            limits = [args.job_timeout_s] if args.job_timeout_s else []
            if args.deadline_s is not None:
                limits.append(args.deadline_s - (t0 - t_start))
            timeout = min(limits) if limits else None
            try:
                r = run_job(args, job, models, run_dir, dev["name"], timeout)
            except RuntimeError as e:  # one failed run leaves the others' results standing
                report["failed"].append({**job, "error": str(e)})
                print(f"FAILED {job}: {e}", flush=True)
                continue
            if job["kind"] == "profile":
                report.setdefault("profiles", []).append(r)
                print(f"{r['tag']}: profiled ({time.monotonic() - t0:.0f} s with loading)",
                      flush=True)
            else:
                report["runs"].append(r)
                a = r.get("analysis", {}).get("phases", {})
                print(f"{r['tag']}: {r['episodes_per_s']:.2f} episodes/s "
                      f"({time.monotonic() - t0:.0f} s with loading); "
                      + ", ".join(f"{k} {v['tflops']:.3g} TF/s" for k, v in a.items()),
                      flush=True)
            write_report(out, report)
    report["wall_s"] = time.monotonic() - t_start
    md = write_report(out, report)
    print(md)
    if report["skipped"]:
        print(f"skipped (budget): {[j['size'] + ' ' + j['side'] + ' ' + j['precision'] for j in report['skipped']]}")
    print(f"wrote {out / 'bench_gpu.json'}")
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
