"""PPO stage: our own PPO with a KL penalty to the frozen SFT policy (TRL 1.16 has none).

Roles as in OpenRLHF: actor (the policy, initialised from SFT), reference (frozen SFT),
critic (value model, initialised from the reward model or the SFT weights), reward model
(frozen, scores normalised with the mean/std saved by the reward stage). The math lives in
``models/ppo.py``; this module runs the loop, logs to MLflow and checkpoints for resume.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Callable, Literal

import torch

from models.ppo import (AdaptiveKLController, FixedKLController, compute_gae, compute_rewards,
                        explained_variance, kl_estimate, masked_mean, masked_whiten,
                        policy_loss, value_loss)
from models.rollout import (Rollout, SharedTrunkCritic, generate, response_logprobs,
                            response_values)
from tasks.base import LoraSettings, PolicyResult, StageConfig, TrackingContext, peft_config


class PPOConfig(StageConfig):
    """PPO hyper-parameters; defaults follow Huang et al. 2024 and TRL's last PPOTrainer."""

    total_episodes: int = 3072
    """Episodes (sampled responses) in the whole stage; updates = total_episodes / batch_size."""
    batch_size: int = 64
    """Episodes per rollout batch (one PPO update)."""
    mini_batch_size: int = 16
    """Episodes per optimiser step within a PPO epoch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per mini-batch (mini_batch_size must divide evenly)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    learning_rate: float = 3e-4
    """AdamW learning rate for policy and critic."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """Learning-rate schedule over updates: linear decay to 0 (Huang et al.) or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    max_prompt_length: int = 32
    """Prompts longer than this keep their last tokens."""
    max_new_tokens: int = 24
    """Response length cap; responses that hit it without EOS are truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    kl_coef: float = 0.05
    """Initial KL coefficient beta."""
    adaptive_kl: bool = True
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019); False keeps beta fixed."""
    kl_target: float = 4.0
    """Target KL per sequence (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (episodes) of the adaptive controller."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator for the penalty (Schulman 2020): k1 in the reward is the classic RLHF choice."""
    kl_in_reward: bool = True
    """True: per-token KL penalty inside the reward. False: KL as a loss term (GRPO style)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float | None = 0.2
    """Value clip around the rollout values; null disables value clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Normalise advantages per batch (mean 0, std 1)."""
    whiten_rewards: bool = False
    """Whiten per-token rewards (no mean shift) before GAE."""
    reward_clip: float | None = None
    """Clip normalised scores to [-reward_clip, reward_clip]; null = no clip."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of responses truncated without EOS; null = no penalty."""
    critic_init: Literal["reward", "sft", "policy"] = "reward"
    """Critic: a separate model initialised from the reward model (TRL's choice) or from the
    SFT weights, or ``policy``: a value head on the policy's own trunk (shared weights)."""
    lora: LoraSettings | None = None
    """LoRA adapters (peft) on policy and critic. The reference policy is then the policy
    with adapters disabled, and with ``critic_init: reward`` the reward model is the critic
    with adapters disabled: no second copy of either base's weights."""
    freeze_layers: int = 0
    """Freeze the input embeddings and the first N transformer blocks of policy and critic."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype for forward passes on a GPU (fp16 adds loss scaling); CPU runs in fp32."""
    kl_budget: float | None = None
    """Stop early when mean KL per sequence exceeds this many nats; null = no budget."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N updates (and at the end)."""
    log_every: int = 1
    """Log metrics every N updates."""


# --- set-up ------------------------------------------------------------------------------


def _load_prompts(uri: str, tokenizer, max_len: int) -> list[list[int]]:
    from dataio import read_records, render_prompt

    rows = read_records(uri)
    prompts = [tokenizer(render_prompt(r["prompt"], tokenizer), add_special_tokens=False)
               ["input_ids"][-max_len:] for r in rows]
    return [p for p in prompts if p]


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


# --- one update -----------------------------------------------------------------------------


def autocast(cfg: PPOConfig, device: torch.device):
    """bf16/fp16 autocast on CUDA when configured; a no-op elsewhere."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def frozen_view(model, frozen):
    """``frozen`` itself, or (when None) ``model`` with its LoRA adapters disabled."""
    if frozen is not None:
        return contextlib.nullcontext(frozen)
    return _disabled_adapters(model)


@contextlib.contextmanager
def _disabled_adapters(model):
    with model.disable_adapter():
        yield model


@torch.no_grad()
def make_rollout(cfg: PPOConfig, policy, ref_policy, critic, reward_model, reward_norm,
                 tokenizer, prompts: list[list[int]], kl_coef: float, device) -> Rollout:
    """Sample responses, then score them: log-probs, reference log-probs, values, rewards."""
    from models.reward import score_sequences

    query_ids, query_mask = (t.to(device) for t in _left_pad(prompts, tokenizer.pad_token_id))
    response, rmask, ended, logp = generate(
        policy, query_ids, query_mask, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, with_logprobs=True)
    ids = torch.cat([query_ids, response], 1)
    attn = torch.cat([query_mask, rmask.long()], 1)
    T = response.shape[1]
    with frozen_view(policy, ref_policy) as ref:
        ref_logp = response_logprobs(ref, ids, attn, response, cfg.temperature)
    values = response_values(critic, ids, attn, T).float()
    with frozen_view(critic, reward_model) as rm:
        scores = reward_norm.normalize(score_sequences(rm, ids, attn).float())
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).float()
    ro = Rollout(query_ids, query_mask, response, rmask, ended, logp, ref_logp, values, scores)
    beta = kl_coef if cfg.kl_in_reward else 0.0
    ro.rewards, ro.kl = compute_rewards(scores, logp, ref_logp, rmask, beta, cfg.kl_estimator)
    if not cfg.kl_in_reward:  # KL still reported as k1, the unbiased estimate
        ro.kl = kl_estimate(logp, ref_logp, "k1") * rmask
    rewards = masked_whiten(ro.rewards, rmask, shift_mean=False) if cfg.whiten_rewards else ro.rewards
    ro.advantages, ro.returns = compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        ro.advantages = masked_whiten(ro.advantages, rmask)
    return ro


def trainable_params(policy, critic) -> list[torch.nn.Parameter]:
    """Policy and critic parameters, each once (a shared-trunk critic repeats the policy's)."""
    seen, out = set(), []
    for p in list(policy.parameters()) + list(critic.parameters()):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def ppo_update(cfg: PPOConfig, policy, critic, optimizer, ro: Rollout, kl_coef: float,
               gen: torch.Generator, scaler: torch.amp.GradScaler | None = None
               ) -> dict[str, float]:
    """ppo_epochs passes of minibatch SGD on one rollout batch; returns averaged stats."""
    stats: dict[str, list[float]] = {}
    B = ro.response_ids.shape[0]
    micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
    params = trainable_params(policy, critic)
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=gen)
        for start in range(0, B, cfg.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            for m in range(start, min(start + cfg.mini_batch_size, B), micro):
                mb = ro.select(perm[m:m + micro].to(ro.response_ids.device))
                ids, attn = mb.input_ids, mb.attention_mask
                with autocast(cfg, ids.device):
                    logp, ent = response_logprobs(policy, ids, attn, mb.response_ids,
                                                  cfg.temperature, with_entropy=True,
                                                  entropy_grad=cfg.ent_coef != 0)
                    vpred = response_values(critic, ids, attn, mb.response_ids.shape[1]).float()
                pl = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_range)
                vl, vclip = value_loss(vpred, mb.values, mb.returns, mb.response_mask,
                                       cfg.clip_range_value)
                entropy = masked_mean(ent, mb.response_mask)
                loss = pl.loss + cfg.vf_coef * vl - cfg.ent_coef * entropy
                if not cfg.kl_in_reward:  # KL as a loss term (k3 by default, GRPO style)
                    kl_term = masked_mean(kl_estimate(logp, mb.ref_logprobs, cfg.kl_estimator),
                                          mb.response_mask)
                    loss = loss + kl_coef * kl_term
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


def _save_checkpoint(path: Path, step: int, policy, critic, optimizer, scheduler, kl_ctl,
                     sampler: PromptSampler, gen: torch.Generator, history: list,
                     stats: dict, stop_reason: str | None) -> None:
    """Everything resume needs; written to a temp file and renamed so a kill mid-write is safe."""
    state = {
        "step": step, "policy": policy.state_dict(), "critic": critic.state_dict(),
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


def train_ppo(cfg: PPOConfig, *, policy, ref_policy, critic, reward_model, reward_norm, tokenizer,
              prompts: list[list[int]], seed: int, checkpoint: Path | None = None,
              log_fn: Callable[[dict[str, float], int], None] | None = None) -> dict:
    """Run PPO to ``total_episodes``; resume from ``checkpoint`` when it exists.

    Returns a summary: steps done, whether it stopped early and why, the last stats.
    """
    from tqdm.auto import tqdm

    if cfg.mini_batch_size % cfg.gradient_accumulation_steps or cfg.batch_size % cfg.mini_batch_size:
        raise ValueError("ppo: batch_size must be a multiple of mini_batch_size, and "
                         "mini_batch_size of gradient_accumulation_steps")
    device = next(policy.parameters()).device
    n_updates = max(1, cfg.total_episodes // cfg.batch_size)
    params = trainable_params(policy, critic)
    # eps 1e-5: CleanRL / Huang et al. detail. fused: one kernel for all tensors, not one
    # per tensor (transformers' and TRL's default too).
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  eps=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda u: 1 - u / n_updates) if cfg.lr_schedule == "linear" else (lambda u: 1.0))
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))
    scaler = (torch.amp.GradScaler("cuda") if device.type == "cuda"
              and cfg.mixed_precision == "fp16" else None)
    sampler = PromptSampler(prompts, seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    start, history, stats, stop_reason = 0, [], {}, None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        policy.load_state_dict(state["policy"])
        critic.load_state_dict(state["critic"])
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
        policy.eval(), critic.eval()  # no dropout while sampling and scoring (Huang et al.)
        with autocast(cfg, device):
            ro = make_rollout(cfg, policy, ref_policy, critic, reward_model, reward_norm,
                              tokenizer, sampler.next_batch(cfg.batch_size), kl_ctl.value, device)
        t_gen = time.perf_counter() - t0
        policy.train(), critic.train()
        stats = ppo_update(cfg, policy, critic, optimizer, ro, kl_ctl.value, gen, scaler)
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
            _save_checkpoint(checkpoint, step, policy, critic, optimizer, scheduler, kl_ctl,
                             sampler, gen, history, stats, stop_reason)
        if stop_reason:
            break
    bar.close()
    steps_done = history[-1]["step"] if history else 0
    if stop_reason is None and steps_done != n_updates:  # never report skipped steps as done
        raise RuntimeError(f"ppo: {steps_done} of {n_updates} updates done, without a stop reason")
    return {"steps": steps_done, "planned_steps": n_updates, "stop_reason": stop_reason,
            "final": stats, "history": history}


def build_models(cfg: PPOConfig, sft_model_uri: str, reward_model_uri: str, pad_token_id: int,
                 device: torch.device):
    """-> policy, reference (None: policy with adapters off), critic, reward model (None:
    critic with adapters off). Without LoRA, reference and reward model are frozen copies."""
    from models.loading import (disable_dropout, freeze_bottom_layers, load_causal_lm,
                                load_sequence_scorer)

    policy = load_causal_lm(sft_model_uri)
    policy.config.pad_token_id = pad_token_id
    freeze_bottom_layers(policy, cfg.freeze_layers)
    critic = None
    if cfg.critic_init != "policy":
        critic = load_sequence_scorer(reward_model_uri if cfg.critic_init == "reward"
                                      else sft_model_uri)
        critic.config.pad_token_id = pad_token_id
        freeze_bottom_layers(critic, cfg.freeze_layers)
    ref_policy = reward_model = None
    if cfg.lora is None:
        ref_policy = load_causal_lm(sft_model_uri)
    else:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config(cfg.lora, "CAUSAL_LM"))
        if critic is not None:
            # modules_to_save: the scalar head trains fully; disabling adapters restores the
            # reward model's own head, so the RM can be the critic's base.
            critic = get_peft_model(critic, peft_config(cfg.lora, "SEQ_CLS", ["score"]))
    if critic is None:
        critic = SharedTrunkCritic(policy)
    if cfg.lora is None or cfg.critic_init != "reward":
        reward_model = load_sequence_scorer(reward_model_uri)
    for m in (ref_policy, reward_model):
        if m is not None:
            m.config.pad_token_id = pad_token_id
            m.eval().requires_grad_(False)
    for m in (policy, critic):
        disable_dropout(m)
    return tuple(m.to(device) if m is not None else None
                 for m in (policy, ref_policy, critic, reward_model))


def run_ppo(cfg: PPOConfig, *, sft_model_uri: str, reward_model_uri: str, prompts_uri: str,
            out_dir: str, seed: int, ctx: TrackingContext) -> PolicyResult:
    """Load actor/reference/critic/reward model, train, save the policy, log it all."""
    import mlflow
    from transformers import set_seed

    from models.loading import load_tokenizer
    from models.reward import RewardNorm
    from tasks.tracking import log_metrics, save_policy, stage_run

    set_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(sft_model_uri)
    policy, ref_policy, critic, reward_model = build_models(cfg, sft_model_uri, reward_model_uri,
                                                            tokenizer.pad_token_id, device)
    reward_norm = RewardNorm.load(reward_model_uri)
    prompts = _load_prompts(prompts_uri, tokenizer, cfg.max_prompt_length)

    with stage_run(ctx, "policy", cfg, seed, algorithm="ppo") as run:
        summary = train_ppo(cfg, policy=policy, ref_policy=ref_policy, critic=critic,
                            reward_model=reward_model, reward_norm=reward_norm,
                            tokenizer=tokenizer, prompts=prompts, seed=seed,
                            checkpoint=out / "checkpoint.pt", log_fn=log_metrics)
        policy_dir = save_policy(policy, tokenizer, out, {"sft_model": sft_model_uri,
                                                          "reward_model": reward_model_uri},
                                 merge_lora=cfg.lora is not None)
        mlflow.log_dict({k: v for k, v in summary.items() if k != "final"}, "ppo_summary.json")
        final = summary["final"]
        metrics = {"ppo/steps": summary["steps"], "ppo/final_kl": final.get("objective/kl", math.nan),
                   "ppo/final_score": final.get("objective/scores", math.nan)}
        mlflow.log_metrics(metrics)
        mlflow.set_tag("ppo.stop_reason", summary["stop_reason"] or "completed")
        return PolicyResult(stage="policy", run_id=run.info.run_id, model_uri=str(policy_dir),
                            metrics=metrics, algorithm="ppo", steps=summary["steps"],
                            planned_steps=summary["planned_steps"],
                            stop_reason=summary["stop_reason"])
