"""The PPO loop: sample a batch, score it, update policy and critic, checkpoint; repeat.

Imports torch and the math in ``models/`` only (no Prefect, no MLflow), so it runs on a GPU
machine that has torch, transformers and pydantic and nothing else. The stage around it
(config, model loading, MLflow) is ``tasks/ppo.py``.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from models.ppo import (AdaptiveKLController, FixedKLController, compute_gae, compute_rewards,
                        explained_variance, kl_estimate, masked_mean, masked_whiten,
                        policy_loss, value_loss)
from models.reward import RewardNorm, score_sequences
from models.rollout import Rollout, generate, response_logprobs, response_values

if TYPE_CHECKING:  # tasks.ppo imports this module for run_ppo; the config is only a type here
    from transformers import PreTrainedTokenizerBase

    from tasks.ppo import PPOConfig


# --- the models of a run -------------------------------------------------------------------


@dataclass
class PPOModels:
    """The models of one PPO run, by RL role (OpenRLHF's actor, reference, critic, reward).

    With LoRA, the frozen roles are no second copy of their weights: the reference is the
    policy with its adapters disabled, and (``critic_init: reward``) the reward model is the
    critic with its adapters disabled. Read them through ``reference_view`` and
    ``reward_model_view``, which hide which of the two a run has.
    """

    policy: torch.nn.Module               # actor, initialised from SFT; trained
    reference: torch.nn.Module | None     # frozen SFT policy; None: policy with adapters off
    critic: torch.nn.Module               # value model (own weights or a SharedTrunkCritic); trained
    reward_model: torch.nn.Module | None  # frozen; None: critic with adapters off
    reward_norm: RewardNorm               # the reward stage's mean/std: scores enter PPO normalised
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def reference_view(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """``with models.reference_view() as ref:`` the frozen SFT policy."""
        return _frozen_view(self.policy, self.reference)

    def reward_model_view(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """``with models.reward_model_view() as rm:`` the frozen reward model."""
        return _frozen_view(self.critic, self.reward_model)

    def train(self, mode: bool = True) -> None:
        """Policy and critic to train (or eval) mode; the frozen models stay in eval mode."""
        self.policy.train(mode), self.critic.train(mode)

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Policy and critic parameters, each once (a shared-trunk critic repeats the policy's)."""
        seen, out = set(), []
        for p in list(self.policy.parameters()) + list(self.critic.parameters()):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out


@contextlib.contextmanager
def _frozen_view(trained: torch.nn.Module, frozen: torch.nn.Module | None
                 ) -> Iterator[torch.nn.Module]:
    """``frozen`` itself, or (when None) ``trained`` with its LoRA adapters disabled."""
    if frozen is not None:
        yield frozen
    else:
        with trained.disable_adapter():
            yield trained


# --- sampling and one update ---------------------------------------------------------------


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


class PromptSampler:
    """Shuffled pass over the prompts, reshuffled each epoch; its state is checkpointed."""

    def __init__(self, prompts: list[list[int]], seed: int):
        self.prompts, self.rng, self.order, self.pos = prompts, random.Random(seed), [], 0

    def next_batch(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            if self.pos >= len(self.order):
                self.order = list(range(len(self.prompts)))
                self.rng.shuffle(self.order)
                self.pos = 0
            out.append(self.prompts[self.order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        st = s["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))
        self.order, self.pos = s["order"], s["pos"]


def autocast(cfg: PPOConfig, device: torch.device):
    """bf16/fp16 autocast on CUDA when configured; a no-op elsewhere."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def make_rollout(cfg: PPOConfig, models: PPOModels, prompts: list[list[int]], *,
                 beta: float) -> Rollout:
    """Sample responses, then score them: log-probs, reference log-probs, values, rewards."""
    tok = models.tokenizer
    query_ids, query_mask = (t.to(models.device) for t in _left_pad(prompts, tok.pad_token_id))
    response, rmask, ended, logp = generate(  # (B, T) each, ended (B,)
        models.policy, query_ids, query_mask, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, with_logprobs=True)
    ids = torch.cat([query_ids, response], 1)  # (B, P+T)
    attn = torch.cat([query_mask, rmask.long()], 1)
    with models.reference_view() as ref:
        ref_logp = response_logprobs(ref, ids, attn, response, cfg.temperature)  # (B, T)
    values = response_values(models.critic, ids, attn, response.shape[1]).float()  # (B, T)
    with models.reward_model_view() as rm:
        scores = models.reward_norm.normalize(score_sequences(rm, ids, attn).float())  # (B,)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).float()
    ro = Rollout(query_ids, query_mask, response, rmask, ended, logp, ref_logp, values, scores)
    ro.rewards, ro.kl = compute_rewards(scores, logp, ref_logp, rmask,
                                        beta if cfg.kl_in_reward else 0.0, cfg.kl_estimator)
    if not cfg.kl_in_reward:  # KL still reported as k1, the unbiased estimate
        ro.kl = kl_estimate(logp, ref_logp, "k1") * rmask
    rewards = masked_whiten(ro.rewards, rmask, shift_mean=False) if cfg.whiten_rewards else ro.rewards
    ro.advantages, ro.returns = compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        ro.advantages = masked_whiten(ro.advantages, rmask)
    return ro


def ppo_update(cfg: PPOConfig, models: PPOModels, ro: Rollout, *, beta: float,
               optimizer: torch.optim.Optimizer, gen: torch.Generator,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """ppo_epochs passes of minibatch SGD on one rollout batch; returns averaged stats."""
    stats: dict[str, list[float]] = {}
    B = ro.response_ids.shape[0]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    params = models.trainable_params()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for start in range(0, B, cfg.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            for m in range(start, min(start + cfg.mini_batch_size, B), micro):
                mb = ro.select(perm[m:m + micro].to(ro.response_ids.device))
                ids, attn = mb.input_ids, mb.attention_mask
                with autocast(cfg, ids.device):
                    logp, ent = response_logprobs(models.policy, ids, attn, mb.response_ids,
                                                  cfg.temperature, with_entropy=True,
                                                  entropy_grad=cfg.ent_coef != 0)
                    vpred = response_values(models.critic, ids, attn,
                                            mb.response_ids.shape[1]).float()
                pl = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_range)
                vl, vclip = value_loss(vpred, mb.values, mb.returns, mb.response_mask,
                                       cfg.clip_range_value)
                entropy = masked_mean(ent, mb.response_mask)
                loss = pl.loss + cfg.vf_coef * vl - cfg.ent_coef * entropy
                if not cfg.kl_in_reward:  # KL as a loss term (k3 by default, GRPO style)
                    kl_term = masked_mean(kl_estimate(logp, mb.ref_logprobs, cfg.kl_estimator),
                                          mb.response_mask)
                    loss = loss + beta * kl_term
                scaled = loss / cfg.gradient_accumulation_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                for k, v in {"policy/clipfrac": pl.clipfrac, "policy/approx_kl": pl.approx_kl,
                             "policy/entropy": entropy, "loss/policy": pl.loss,
                             "loss/value": vl, "val/clipfrac": vclip}.items():
                    stats.setdefault(k, []).append(float(v.detach()))
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            stats.setdefault("policy/grad_norm", []).append(float(grad_norm))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
    return {k: sum(v) / len(v) for k, v in stats.items()}


# --- the loop, checkpoints, the stage ---------------------------------------------------------


def _save_checkpoint(path: Path, step: int, models: PPOModels, optimizer, scheduler, kl_ctl,
                     sampler: PromptSampler, gen: torch.Generator, history: list,
                     stats: dict, stop_reason: str | None) -> None:
    """Everything resume needs; written to a temp file and renamed so a kill mid-write is safe."""
    state = {
        "step": step, "policy": models.policy.state_dict(), "critic": models.critic.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "kl_ctl": kl_ctl.state_dict(), "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(), "gen": gen.get_state(), "history": history,
        "stats": stats, "stop_reason": stop_reason,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_ppo(cfg: PPOConfig, models: PPOModels, *, prompts: list[list[int]], seed: int,
              checkpoint: Path | None = None,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict:
    """Run PPO to ``total_episodes``; resume from ``checkpoint`` when it exists.

    Returns a summary: steps done, whether it stopped early and why, the last stats.
    """
    from tqdm.auto import tqdm

    if cfg.mini_batch_size % cfg.gradient_accumulation_steps or cfg.batch_size % cfg.mini_batch_size:
        raise ValueError("ppo: batch_size must be a multiple of mini_batch_size, and "
                         "mini_batch_size of gradient_accumulation_steps")
    device = models.device
    n_updates = max(1, cfg.total_episodes // cfg.batch_size)
    params = models.trainable_params()
    # eps 1e-5: CleanRL / Huang et al. detail. fused: one kernel for all tensors, not one
    # per tensor (transformers' and TRL's default too).
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  eps=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda u: 1 - u / n_updates) if cfg.lr_schedule == "linear" else (lambda u: 1.0))
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.init_kl_coef))
    scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda"
              and cfg.mixed_precision == "fp16" else None)
    sampler = PromptSampler(prompts, seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start, history, stats, stop_reason = 0, [], {}, None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        models.policy.load_state_dict(state["policy"])
        models.critic.load_state_dict(state["critic"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["gen"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, history = state["step"], state["history"]
        stats, stop_reason = state["stats"], state["stop_reason"]

    bar = tqdm(range(start if stop_reason is None else n_updates, n_updates), desc="ppo", initial=start, total=n_updates)
    for update in bar:
        t0 = time.perf_counter()
        models.train(False)  # no dropout while sampling and scoring (Huang et al.)
        with autocast(cfg, device):
            ro = make_rollout(cfg, models, sampler.next_batch(cfg.batch_size), beta=kl_ctl.value)
        t_gen = time.perf_counter() - t0
        models.train()
        stats = ppo_update(cfg, models, ro, beta=kl_ctl.value, optimizer=optimizer, gen=gen,
                           scaler=scaler)
        scheduler.step()
        seq_kl = ro.kl.sum(1)  # (B,) KL to the reference per sequence
        mean_kl = float(seq_kl.mean())
        n_tokens = float(ro.response_mask.sum())
        elapsed = time.perf_counter() - t0
        stats.update({
            "objective/kl": mean_kl, "objective/kl_max_seq": float(seq_kl.max()),
            "objective/kl_coef": kl_ctl.value, "objective/scores": float(ro.scores.mean()),
            "objective/rlhf_reward": float((ro.scores - kl_ctl.value * seq_kl).mean()),
            "objective/non_score_reward": float((-kl_ctl.value * seq_kl).mean()),
            "val/explained_variance": explained_variance(ro.values, ro.returns, ro.response_mask),
            "val/mean": float(masked_mean(ro.values, ro.response_mask)),
            "episode/length": float(ro.response_mask.sum(1).mean()),
            "episode/eos_rate": float(ro.ended_with_eos.float().mean()),
            "perf/episodes_per_s": cfg.batch_size / elapsed,
            "perf/tokens_per_s": n_tokens / elapsed, "perf/generation_share": t_gen / elapsed,
            "lr": scheduler.get_last_lr()[0],
        })
        kl_ctl.update(mean_kl, cfg.batch_size)
        step = update + 1
        history.append({"step": step, "kl": mean_kl, "score": stats["objective/scores"]})
        bar.set_postfix(kl=f"{mean_kl:.2f}", score=f"{stats['objective/scores']:.2f}")
        if log_fn is not None and (step % cfg.log_every == 0 or step == n_updates):
            log_fn({f"ppo/{k}": v for k, v in stats.items()}, step)
        if cfg.kl_budget is not None and mean_kl > cfg.kl_budget:
            stop_reason = f"KL {mean_kl:.2f} nats exceeded kl_budget {cfg.kl_budget} at step {step}"
        if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == n_updates
                                       or stop_reason):
            _save_checkpoint(checkpoint, step, models, optimizer, scheduler, kl_ctl,
                             sampler, gen, history, stats, stop_reason)
        if stop_reason:
            break
    bar.close()
    steps_done = history[-1]["step"] if history else 0
    if stop_reason is None and steps_done != n_updates:  # never report skipped steps as done
        raise RuntimeError(f"ppo: {steps_done} of {n_updates} updates done, without a stop reason")
    return {"steps": steps_done, "planned_steps": n_updates, "stop_reason": stop_reason,
            "final": stats, "history": history}
