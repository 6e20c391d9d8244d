"""Evaluate stage: the trained policy against the SFT policy on held-out prompts.

Both policies sample ``samples_per_prompt`` responses per held-out prompt. Per prompt, the
policy wins when its mean gold-judge score beats the SFT's (a tie counts half); the win rate
is the share of prompts won. KL(policy || SFT) per sequence is the summed log-ratio on the
policy's own samples: an unbiased estimate of the sequence-level KL.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from prefect import task

from tasks.base import StageConfig, StageResult, TrackingContext


class EvaluateConfig(StageConfig):
    """Held-out evaluation settings."""

    samples_per_prompt: int = 4
    """Responses sampled per prompt and per policy; more gives a less noisy win rate."""
    max_new_tokens: int = 24
    """Response length cap (use the policy stage's)."""
    temperature: float = 1.0
    """Sampling temperature for both policies."""
    gold_judge: str | None = "demo.judge:sentiment_judge"
    """``module:function`` scoring a list of completions (list[str] -> list[float]); the
    trusted judge. Null: win rate by the reward model instead (less trustworthy)."""
    max_prompts: int | None = None
    """Evaluate on the first N held-out prompts only; null = all."""
    batch_size: int = 128
    """Sequences per generation/scoring batch."""


class EvaluateResult(StageResult):
    """Held-out metrics of the policy against SFT (``eval/...``), and who judged them."""

    judge: str
    """The gold judge's ``module:function``, or ``reward_model`` when none is configured."""


def load_judge(spec: str) -> Callable[[list[str]], list[float]]:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"evaluate.gold_judge {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


def per_prompt_win_rate(policy_scores: torch.Tensor, sft_scores: torch.Tensor) -> float:
    """(N, k) scores per prompt and sample -> share of prompts where the policy's mean is
    higher; ties count half."""
    p, s = policy_scores.mean(1), sft_scores.mean(1)
    return float(((p > s).float() + 0.5 * (p == s).float()).mean())


@torch.no_grad()
def _sample(model, tokenizer, prompts, cfg: EvaluateConfig, device):
    """-> ids (N, P+T), attention mask, response ids (N, T), response mask (N, T), texts."""
    from models.rollout import generate

    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    q, qm = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    resp, rmask, _ = generate(model, q, qm, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(resp.masked_fill(rmask == 0, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    return torch.cat([q, resp], 1), torch.cat([qm, rmask.long()], 1), resp, rmask, texts


@torch.no_grad()
def run_evaluate(cfg: EvaluateConfig, *, policy_uri: str, sft_model_uri: str,
                 reward_model_uri: str, eval_prompts_uri: str, seed: int,
                 ctx: TrackingContext) -> EvaluateResult:
    import mlflow
    from transformers import set_seed

    from models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
    from models.ppo import masked_sum
    from models.reward import RewardNorm, score_sequences
    from models.rollout import response_logprobs
    from dataio import read_records, render_prompt
    from tasks.tracking import stage_run

    set_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(policy_uri)
    policy = load_causal_lm(policy_uri).to(device).eval()
    sft = load_causal_lm(sft_model_uri).to(device).eval()
    rm = load_sequence_scorer(reward_model_uri).to(device).eval()
    for m in (policy, sft, rm):
        m.config.pad_token_id = tokenizer.pad_token_id
    norm = RewardNorm.load(reward_model_uri)
    prompts = [render_prompt(r["prompt"], tokenizer) for r in read_records(eval_prompts_uri)]
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    k = cfg.samples_per_prompt
    expanded = [p for p in prompts for _ in range(k)]

    results = {}
    for name, model in (("policy", policy), ("sft", sft)):
        # Same random stream for both policies (common random numbers): the SFT baseline is
        # then identical whichever policy it is compared with, for a given seed.
        torch.manual_seed(seed)
        texts, rm_scores, lengths, kls = [], [], [], []
        for i in range(0, len(expanded), cfg.batch_size):
            ids, attn, resp, rmask, t = _sample(model, tokenizer, expanded[i:i + cfg.batch_size],
                                                cfg, device)
            texts += t
            rm_scores.append(norm.normalize(score_sequences(rm, ids, attn).float()).cpu())
            lengths.append(rmask.sum(1).cpu())
            if name == "policy":
                lp = response_logprobs(policy, ids, attn, resp, cfg.temperature)
                lq = response_logprobs(sft, ids, attn, resp, cfg.temperature)
                kls.append(masked_sum(lp - lq, rmask, dim=1).cpu())
        results[name] = {"texts": texts, "rm": torch.cat(rm_scores).view(-1, k),
                         "len": torch.cat(lengths).float()}
        if kls:
            results[name]["kl"] = torch.cat(kls)
    if cfg.gold_judge:
        judge = load_judge(cfg.gold_judge)
        for r in results.values():
            r["gold"] = torch.tensor(judge(r["texts"]), dtype=torch.float).view(-1, k)

    pol, ref = results["policy"], results["sft"]
    judged = "gold" if cfg.gold_judge else "rm"
    metrics = {
        "eval/win_rate": per_prompt_win_rate(pol[judged], ref[judged]),
        "eval/win_rate_rm": per_prompt_win_rate(pol["rm"], ref["rm"]),
        "eval/rm_policy": float(pol["rm"].mean()), "eval/rm_sft": float(ref["rm"].mean()),
        "eval/kl_policy_sft": float(pol["kl"].mean()),
        "eval/kl_policy_sft_max": float(pol["kl"].max()),
        "eval/len_policy": float(pol["len"].mean()), "eval/len_sft": float(ref["len"].mean()),
        "eval/num_prompts": len(prompts),
    }
    if cfg.gold_judge:
        metrics.update({"eval/gold_policy": float(pol["gold"].mean()),
                        "eval/gold_sft": float(ref["gold"].mean())})

    with stage_run(ctx, "evaluate", cfg, seed) as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tag("eval.judge", cfg.gold_judge or "reward_model")
        table = {"prompt": expanded, "policy": pol["texts"], "sft": ref["texts"],
                 "rm_policy": pol["rm"].flatten().tolist(), "rm_sft": ref["rm"].flatten().tolist()}
        if cfg.gold_judge:
            table.update(gold_policy=pol["gold"].flatten().tolist(),
                         gold_sft=ref["gold"].flatten().tolist())
        mlflow.log_table(table, "eval_samples.json")
        return EvaluateResult(stage="evaluate", run_id=run.info.run_id, metrics=metrics,
                              judge=cfg.gold_judge or "reward_model")


evaluate_task = task(name="evaluate")(run_evaluate)
