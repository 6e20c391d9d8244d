"""Check and time ``decode_cache: graphs`` (``models.rollout.decode_static``) on one device.

    python bench/device/check_graph_decode.py --device cuda --size 100m --out DIR

A GPT-2 of a ``bench_gpu`` size (random weights, the demo tokenizer), fp32 weights under bf16
autocast as the trainer samples on a GPU, one batch of the benchmark's prompts. It samples
the batch three ways, each twice (the first call pays the set-up, the second is timed as
steady): ``decode_static`` with its CUDA graph, the same loop eagerly, and ``decode`` (the
dynamic cache). Then it checks what a captured graph could get wrong and a CPU test cannot
reach: that the capture happened (a failed capture only warns; here it is an error), and
that the graph's log-probs of the tokens it sampled equal a fresh forward's over the whole
episodes (cache slots, masks and positions right at every step). Writes
``graph_decode.json``. On CPU (``--device cpu --size tiny``) the graph parts are skipped:
that run checks the script itself, in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(HERE))

import bench_gpu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="100m", choices=list(bench_gpu.SIZES))
    p.add_argument("--batch", type=int, default=None, help="default: the size's batch")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="bench/out/device")
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from models.loading import load_tokenizer
    from models.rollout import (decode, decode_static, left_pad_episodes, pad_sequences,
                                response_logprobs, response_mask_from_ids)
    from tasks.ppo import _load_prompts

    device = torch.device(args.device)
    size = bench_gpu.SIZES[args.size]
    tok = load_tokenizer(str(ROOT / "demo/base_model"))
    conf = AutoConfig.from_pretrained(ROOT / "demo/base_model")
    for k, v in (size["config"] or {}).items():
        setattr(conf, k, v)
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(conf).eval()
    B = args.batch or size["batch"]
    width = bench_gpu.bench_ppo.MAX_PROMPT_LENGTH
    # the benchmark's prompts, tokenised and cut as the PPO stage does
    prompts = _load_prompts(str(ROOT / "demo/data/rl_prompts.jsonl"), tok, width)
    ids = (prompts * (B // len(prompts) + 1))[:B]
    q, qm = (x.to(device) for x in pad_sequences(ids, tok.pad_token_id, left=True))
    cuda = device.type == "cuda"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda
                else contextlib.nullcontext())
    kw = dict(max_new_tokens=args.new_tokens, temperature=1.0,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def timed(fn):
        out, times = None, []
        for _ in range(2):
            torch.manual_seed(1)
            t0 = clock()
            with autocast, warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed capture warns: fail here instead
                out = fn()
            times.append(clock() - t0)
        return out, times

    ways = {"dynamic": lambda: decode(model, q, qm, **kw),
            "static_eager": lambda: decode_static(model, q, qm, **kw, prompt_width=width)}
    if cuda:
        ways["static_graph"] = lambda: decode_static(model, q, qm, **kw, prompt_width=width,
                                                     cuda_graph=True)
    report = {"device": torch.cuda.get_device_name(device) if cuda else "cpu",
              "size": args.size, "batch": B, "new_tokens": args.new_tokens,
              "torch": torch.__version__, "ways": {}}
    for name, fn in ways.items():
        (resp, logp), times = timed(fn)
        mask, _ = response_mask_from_ids(resp, tok.eos_token_id)
        mask = mask.to(device)
        e_ids, e_mask = left_pad_episodes(q, qm, resp.masked_fill(mask == 0, tok.pad_token_id),
                                          mask)
        with torch.no_grad(), autocast:
            fresh = response_logprobs(model, e_ids, e_mask, resp, 1.0, response_mask=mask)
        diff = ((fresh.float() - logp.float()) * mask).abs()
        tokens = float(mask.sum())
        report["ways"][name] = {
            "first_s": times[0], "steady_s": times[1], "width": resp.shape[1],
            "tokens": tokens, "steps_per_s": resp.shape[1] / times[1],
            "tokens_per_s": tokens / times[1],
            "logp_vs_forward_max_abs": float(diff.max()),
            "logp_vs_forward_mean_abs": float(diff.sum() / max(tokens, 1.0))}
        print(name, json.dumps(report["ways"][name]), flush=True)
    # bf16 forwards of different shapes differ by rounding; a wrong slot, mask or position
    # differs by whole nats.
    limit = 0.25 if cuda else 1e-3
    bad = {n: w["logp_vs_forward_mean_abs"] for n, w in report["ways"].items()
           if not w["logp_vs_forward_mean_abs"] < limit}
    report["ok"] = not bad
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "graph_decode.json").write_text(json.dumps(report, indent=1))
    if bad:
        raise SystemExit(f"check_graph_decode: log-probs off a fresh forward by {bad} "
                         f"(mean abs, limit {limit})")


if __name__ == "__main__":
    main()
