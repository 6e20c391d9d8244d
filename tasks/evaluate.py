"""Evaluate stage: the candidate policy against SFT and against the champion, on held-out prompts.

Every policy (candidate, SFT, and the current ``production`` version when there is one) samples
``samples_per_prompt`` responses per held-out prompt from the same random stream (common random
numbers: sample j of prompt i is comparable across policies). Each response is scored by

- the gold judge, when one is configured (``gold_judge``: a trusted ``module:function``);
- the held-out reward model, trained by the reward stage with a seed the policy's reward model
  never saw; without a gold judge it is the judge (and the gate says so);
- the policy's own reward model (what PPO optimised: a diagnostic, and the judge only when
  there is neither a gold judge nor a held-out model).

Per prompt the candidate wins when its mean score beats the baseline's (a tie counts half);
the win rate is the share of prompts won, with a percentile bootstrap interval over prompts.
Reward-hacking diagnostics that need no gold judge (``models/diagnostics.py``): how much the
reward models' scores follow response length (Singhal et al. 2023), the win rate among
responses of about the same length (the question of Dubois et al. 2024), repetition and
distinct-2, and perplexity on held-out SFT demonstrations (a capability-regression check).
KL(policy || SFT) per sequence is the summed log-ratio on the policy's own samples: an
unbiased estimate of the sequence-level KL.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable

from prefect import task

from tasks.base import StageConfig, StageResult, TrackingContext


class EvaluateConfig(StageConfig):
    """Held-out evaluation settings."""

    samples_per_prompt: int = 4
    """Responses sampled per prompt and per policy; more gives a less noisy win rate."""
    max_new_tokens: int = 128
    """Response length cap (use the policy stage's)."""
    temperature: float = 1.0
    """Sampling temperature for every policy."""
    gold_judge: str | None = None
    """``module:function`` scoring a list of completions (list[str] -> list[float]); the
    trusted judge. Null: the held-out reward model judges instead; the reward-hacking
    diagnostics then guard the gate (see ``gate``)."""
    max_prompts: int | None = None
    """Evaluate on the first N held-out prompts only; null = all."""
    batch_size: int = 32
    """Sequences per generation/scoring batch."""
    bootstrap_samples: int = 2000
    """Bootstrap replicates (prompts resampled) for the win rates' confidence intervals."""
    confidence: float = 0.95
    """Coverage of the win rates' confidence intervals."""

    def code_modules(self) -> list[str]:
        """The gold judge's module: editing the judge re-runs the evaluation."""
        return [self.gold_judge.partition(":")[0]] if self.gold_judge else []


class EvaluateResult(StageResult):
    """Held-out metrics of the candidate (``eval/...``; ``eval/champion/...`` against the
    production version), and who judged them."""

    judge: str
    """The gold judge's ``module:function``, else ``heldout_rm`` (the held-out reward model) or,
    without one, ``rm``."""
    champion_version: str | None = None
    """The production version the candidate was compared with; None if there was none."""


def load_judge(spec: str) -> Callable[[list[str]], list[float]]:
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"evaluate.gold_judge {spec!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), name)


def no_grad(fn: Callable) -> Callable:
    """``torch.no_grad()`` around ``fn``, torch imported at the first call: the config imports
    this module for ``EvaluateConfig``, and every ``rlhf`` command would pay ~1 s for torch."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@dataclass
class Samples:
    """One policy's responses to the expanded prompts, scored; N prompts x k samples."""

    texts: list[str]
    length: torch.Tensor  # (N * k,) response tokens, EOS included
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # judge -> (N * k,)
    kl: torch.Tensor | None = None  # (N * k,) summed log-ratio to SFT (candidate only)


@no_grad
def sample_and_score(model, tokenizer, prompts: list[str], cfg: EvaluateConfig, seed: int,
                     scorers: dict, sft=None) -> Samples:
    """Sample every prompt with ``model`` from the same random stream, score each response
    with every reward model in ``scorers`` (name -> model, raw scores); with ``sft`` given,
    also the per-sequence log-ratio to it on the same tokens."""
    import torch

    from models.ppo import masked_sum
    from models.reward import score_sequences
    from models.rollout import generate, response_logprobs

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    texts, lengths, kls, raw = [], [], [], {name: [] for name in scorers}
    for i in range(0, len(prompts), cfg.batch_size):
        enc = tokenizer(prompts[i:i + cfg.batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        q, qm = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, P)
        resp, rmask, _ = generate(model, q, qm, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)  # (B, T)
        ids, attn = torch.cat([q, resp], 1), torch.cat([qm, rmask.long()], 1)  # (B, P+T)
        texts += tokenizer.batch_decode(resp.masked_fill(rmask == 0, tokenizer.pad_token_id),
                                        skip_special_tokens=True)
        lengths.append(rmask.sum(1).cpu())
        for name, scorer in scorers.items():
            raw[name].append(score_sequences(scorer, ids, attn).float().cpu())
        if sft is not None:
            lp = response_logprobs(model, ids, attn, resp, cfg.temperature)
            lq = response_logprobs(sft, ids, attn, resp, cfg.temperature)
            kls.append(masked_sum(lp - lq, rmask, dim=1).cpu())
    return Samples(texts, torch.cat(lengths).float(), {n: torch.cat(v) for n, v in raw.items()},
                   torch.cat(kls) if kls else None)


def demonstration_text(row: dict, tokenizer) -> tuple[str, str]:
    """(prompt, completion) text of an SFT row in any TRL format the SFT stage reads."""
    from dataio import is_conversational, render_prompt

    if "messages" in row:  # conversational language modeling: the last turn is the answer
        prompt, answer = row["messages"][:-1], row["messages"][-1:]
    elif "prompt" in row:
        prompt, answer = row["prompt"], row["completion"]
    else:  # plain text: no prompt
        return "", row["text"]
    if not is_conversational(answer):
        return prompt, answer
    head = render_prompt(prompt, tokenizer)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    return head, full[len(head):] if full.startswith(head) else full


@no_grad
def heldout_perplexity(model, tokenizer, rows: list[dict], batch_size: int) -> float:
    """exp(mean NLL per completion token, EOS included) of held-out SFT demonstrations."""
    import torch

    from models.ppo import masked_sum
    from models.rollout import pad_sequences, response_logprobs

    device = next(model.parameters()).device
    nll, count = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        texts = [demonstration_text(r, tokenizer) for r in rows[i:i + batch_size]]
        prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
        answers = tokenizer([a for _, a in texts], add_special_tokens=False)["input_ids"]
        # Plain text has no prompt: condition its first token on BOS (EOS where there is none).
        bos = tokenizer.bos_token_id
        prompts = [p or [tokenizer.eos_token_id if bos is None else bos] for p in prompts]
        q, qm = pad_sequences(prompts, tokenizer.pad_token_id, left=True)  # (B, P)
        c, cm = pad_sequences([a + [tokenizer.eos_token_id] for a in answers],
                              tokenizer.pad_token_id, left=False)  # (B, T)
        ids, attn = torch.cat([q, c], 1).to(device), torch.cat([qm, cm], 1).to(device)
        lp = response_logprobs(model, ids, attn, c.to(device))  # (B, T)
        nll -= float(masked_sum(lp, cm.to(device).float(), dim=1).sum())
        count += float(cm.sum())
    return float(torch.exp(torch.tensor(nll / max(count, 1.0))))


def compare(cand: Samples, base: Samples, judge: str, k: int, cfg: EvaluateConfig,
            seed: int) -> dict[str, float]:
    """Win rate of ``cand`` over ``base`` by ``judge``, its bootstrap interval, and the win
    rate among responses of about the same length (and how many such pairs there were)."""
    from models.diagnostics import bootstrap_ci, length_matched_win_rate, per_prompt_wins

    a, b = cand.scores[judge].view(-1, k), base.scores[judge].view(-1, k)  # (N, k)
    mean, lo, hi = bootstrap_ci(per_prompt_wins(a, b), cfg.bootstrap_samples,
                                1 - cfg.confidence, seed)
    matched, pairs = length_matched_win_rate(a, b, cand.length.view(-1, k),
                                             base.length.view(-1, k))
    return {f"win_rate_{judge}": mean, f"win_rate_{judge}_lo": lo, f"win_rate_{judge}_hi": hi,
            f"matched_win_rate_{judge}": matched, f"matched_pairs_{judge}": pairs}


def diagnostics(name: str, s: Samples) -> dict[str, float]:
    """Length, repetition and how much each reward model's score follows length."""
    from models.diagnostics import distinct_n, repetition_rate, spearman

    out = {f"len_{name}": float(s.length.mean()),
           f"repetition_{name}": sum(map(repetition_rate, s.texts)) / max(len(s.texts), 1),
           f"distinct2_{name}": distinct_n(s.texts, 2)}
    for judge, scores in s.scores.items():
        out[f"{judge}_{name}"] = float(scores.mean())
    return out


@no_grad
def run_evaluate(cfg: EvaluateConfig, *, policy_uri: str, sft_model_uri: str,
                 reward_model_uri: str, heldout_reward_uri: str | None, eval_prompts_uri: str,
                 heldout_sft_uri: str | None = None, champion_uri: str | None = None,
                 champion_version: str | None = None, seed: int,
                 ctx: TrackingContext) -> EvaluateResult:
    import mlflow
    import torch
    from transformers import set_seed

    from models.diagnostics import spearman
    from models.loading import load_causal_lm, load_sequence_scorer, load_tokenizer
    from models.reward import RewardNorm
    from dataio import read_records, render_prompt
    from tasks.tracking import stage_run

    set_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(policy_uri)

    def load(loader, uri):
        model = loader(uri).to(device).eval()
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    sft = load(load_causal_lm, sft_model_uri)
    # "rm": what the policy optimised; "heldout_rm": a reward model it never saw.
    scorers = {"rm": load(load_sequence_scorer, reward_model_uri)}
    if heldout_reward_uri:
        scorers["heldout_rm"] = load(load_sequence_scorer, heldout_reward_uri)
    judge = "gold" if cfg.gold_judge else ("heldout_rm" if heldout_reward_uri else "rm")
    prompts = [render_prompt(r["prompt"], tokenizer) for r in read_records(eval_prompts_uri)]
    prompts = prompts[: cfg.max_prompts] if cfg.max_prompts else prompts
    k = cfg.samples_per_prompt
    expanded = [p for p in prompts for _ in range(k)]

    policies = {"policy": policy_uri, "sft": sft_model_uri}
    if champion_uri and load_tokenizer(champion_uri).get_vocab() != tokenizer.get_vocab():
        # Scores and KL here compare token ids: a champion with another vocabulary (another
        # base model) would need text-level scoring, so it is not compared (and the tag says so).
        champion_version = f"{champion_version} (skipped: different tokenizer)"
    elif champion_uri:
        policies["champion"] = champion_uri
    samples, ppl = {}, {}
    heldout_rows = read_records(heldout_sft_uri) if heldout_sft_uri else []
    for name, uri in policies.items():
        model = sft if name == "sft" else load(load_causal_lm, uri)
        samples[name] = sample_and_score(model, tokenizer, expanded, cfg, seed, scorers,
                                         sft=sft if name == "policy" else None)
        if heldout_rows:
            ppl[name] = heldout_perplexity(model, tokenizer, heldout_rows, cfg.batch_size)
    if cfg.gold_judge:
        gold = load_judge(cfg.gold_judge)
        for s in samples.values():
            s.scores["gold"] = torch.tensor(gold(s.texts), dtype=torch.float)

    pol, ref = samples["policy"], samples["sft"]
    norm = RewardNorm.load(reward_model_uri)
    # The policy reward model's calibrated P(candidate sample preferred over the SFT sample
    # drawn with the same random numbers), with the temperature fitted on held-out pairs.
    metrics = {"rm_pref_prob": float(norm.preference_prob(pol.scores["rm"],
                                                          ref.scores["rm"]).mean())}
    for s in samples.values():  # the policy's reward model on PPO's scale: SFT samples ~ N(0, 1)
        s.scores["rm"] = norm.normalize(s.scores["rm"])
    vs_sft = {j: compare(pol, ref, j, k, cfg, seed) for j in pol.scores}
    for by_judge in vs_sft.values():
        metrics.update(by_judge)
    # The headline: the most trusted judge against SFT.
    metrics.update({key.replace(f"_{judge}", ""): v for key, v in vs_sft[judge].items()})
    metrics.update({"kl_policy_sft": float(pol.kl.mean()), "kl_policy_sft_max": float(pol.kl.max()),
                    "num_prompts": len(prompts), **diagnostics("policy", pol),
                    **diagnostics("sft", ref)})
    metrics.update({f"ppl_{name}": v for name, v in ppl.items()})
    # How much each reward model's score follows length, on both policies' samples pooled.
    lengths = torch.cat([pol.length, ref.length])
    for j in scorers:
        metrics[f"{j}_length_corr"] = spearman(torch.cat([pol.scores[j], ref.scores[j]]), lengths)
    if "champion" in samples:
        champ = samples["champion"]
        metrics.update({f"champion/{key.replace(f'_{judge}', '')}": v
                        for key, v in compare(pol, champ, judge, k, cfg, seed).items()})
        metrics.update(diagnostics("champion", champ))
    metrics = {f"eval/{key}": float(v) for key, v in metrics.items()}

    with stage_run(ctx, "evaluate", cfg, seed) as run:
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"eval.judge": cfg.gold_judge or judge,
                         "eval.champion_version": champion_version or "none"})
        table = {"prompt": expanded}
        for name, s in samples.items():
            table[name] = s.texts
            table.update({f"{j}_{name}": v.tolist() for j, v in s.scores.items()})
        mlflow.log_table(table, "eval_samples.json")
        fig = score_histograms(samples)
        mlflow.log_figure(fig, "eval_scores.png")
        fig.clf()
        return EvaluateResult(stage="evaluate", run_id=run.info.run_id, metrics=metrics,
                              judge=cfg.gold_judge or judge, champion_version=champion_version)


def score_histograms(samples: dict[str, Samples]):
    """One panel per judge plus one for length: each policy's distribution overlaid."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    judges = list(next(iter(samples.values())).scores)
    fig, axes = plt.subplots(1, len(judges) + 1, figsize=(4 * (len(judges) + 1), 3))
    for ax, key in zip(axes, judges + ["length"]):
        for name, s in samples.items():
            values = s.length if key == "length" else s.scores[key]
            ax.hist(values.numpy(), bins=30, alpha=0.5, label=name)
        ax.set_title(key)
    axes[0].legend()
    fig.tight_layout()
    return fig


evaluate_task = task(name="evaluate")(run_evaluate)
