"""The PPO loop, read top to bottom as in CleanRL's ppo.py: sample a batch of responses, score
it, run ``ppo_epochs`` of minibatch updates on policy and critic, adapt beta, checkpoint; repeat.

Imports torch, ``models/`` and ``tasks/distributed.py`` only (no Prefect, no MLflow, no
pydantic; tqdm when it runs), so it runs on a GPU machine that has torch and transformers and
nothing else; its config class and model loading (``tasks/ppo.py``) add pydantic, which
bench/device/ carries as a wheel. Under ``accelerate launch`` each process
samples and scores its own share of every batch and gradients are averaged before each step
(``tasks/distributed.py``): the same updates as one process on the whole batch, up to the
sampling noise and float summation order. The stage around it (config, model
loading, MLflow) is ``tasks/ppo.py``; the math is ``models/ppo.py``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from models.ppo import (AdaptiveKLController, FixedKLController, compute_gae, compute_rewards,
                        explained_variance, kl_estimate, masked_mean, masked_whiten,
                        policy_loss, value_loss)
from models.reward import RewardNorm, score_sequences
from models.rollout import (Rollout, generate, graph_decodable, left_pad_episodes, pad_columns,
                            pad_sequences, response_logprobs, response_values, round_width)
from tasks.distributed import DataParallel
from tasks.side_thread import SideThread, half_threads, intra_op_threads

log = logging.getLogger(__name__)

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
    critic: torch.nn.Module               # value model, own weights or a SharedTrunkCritic; trained
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


# --- the state of a run, and its checkpoints ------------------------------------------------


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


@dataclass
class TrainState:
    """Everything besides the weights that decides the next update: a checkpoint saves it with
    the weights and the RNGs, so a resumed run repeats the uninterrupted one."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    kl_ctl: FixedKLController     # beta = kl_ctl.value; AdaptiveKLController moves it
    sampler: PromptSampler        # which prompts come next
    gen: torch.Generator          # minibatch permutations
    step: int = 0                 # updates done
    history: list[dict] = field(default_factory=list)     # {"step", "kl", "score"} per update
    stats: dict[str, float] = field(default_factory=dict)  # the last update's metrics
    stop_reason: str | None = None  # why the run stopped before total_episodes (KL budget)
    accumulation: int | None = None  # micro-batches per mini-batch, once auto_micro_batch split


def init_train_state(cfg: PPOConfig, models: PPOModels, prompts: list[list[int]], seed: int,
                     n_updates: int) -> TrainState:
    """Step 0: a fresh optimizer over policy and critic, lr schedule, KL controller and sampler."""
    # eps 1e-5: CleanRL / Huang et al. detail. fused: one kernel for all tensors, not one
    # per tensor (transformers' and TRL's default too).
    optimizer = torch.optim.AdamW(models.trainable_params(), lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay, eps=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda u: 1 - u / n_updates) if cfg.lr_schedule == "linear" else (lambda u: 1.0))
    kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.init_kl_coef))
    return TrainState(optimizer, scheduler, kl_ctl, PromptSampler(prompts, seed),
                      torch.Generator().manual_seed(seed))


def rng_state() -> dict:
    """This process's sampling RNGs (CPU, and every GPU's when there are any)."""
    out = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    return out


def save_checkpoint(path: Path, models: PPOModels, state: TrainState,
                    rank_rngs: list[dict] | None = None) -> None:
    """Weights, ``state`` and the RNGs, written to a temp file and renamed: a kill mid-write
    leaves the previous checkpoint whole. ``rank_rngs``: every process's RNGs in a
    data-parallel run (the weights and ``state`` are the same in all of them)."""
    ckpt = {
        "step": state.step, "policy": models.policy.state_dict(),
        "critic": models.critic.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "kl_ctl": state.kl_ctl.state_dict(),
        "sampler": state.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
        "gen": state.gen.get_state(), "history": state.history, "stats": state.stats,
        "stop_reason": state.stop_reason, "accumulation": state.accumulation,
    }
    if torch.cuda.is_available():
        ckpt["cuda_rng"] = torch.cuda.get_rng_state_all()
    if rank_rngs is not None and len(rank_rngs) > 1:
        ckpt["rank_rngs"] = rank_rngs
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)


def restore_checkpoint(path: Path, models: PPOModels, state: TrainState,
                       dp: DataParallel | None = None) -> None:
    """Load what ``save_checkpoint`` wrote back into ``models`` and ``state``, RNGs included
    (this process's own, when the checkpoint has one per process)."""
    ckpt = torch.load(path, weights_only=False)
    models.policy.load_state_dict(ckpt["policy"])
    models.critic.load_state_dict(ckpt["critic"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.kl_ctl.load_state_dict(ckpt["kl_ctl"])
    state.sampler.load_state_dict(ckpt["sampler"])
    rngs = ckpt
    if dp is not None and dp.distributed:
        per_rank = ckpt.get("rank_rngs") or []
        # Another number of processes than the run that saved it: no RNG state of ours there.
        rngs = per_rank[dp.rank] if len(per_rank) == dp.world_size else None
    if rngs is None:
        torch.manual_seed(1000003 * dp.rank + ckpt["step"])  # distinct per process and step
    else:
        torch.set_rng_state(rngs["torch_rng"])
        if "cuda_rng" in rngs and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rngs["cuda_rng"])
    state.gen.set_state(ckpt["gen"])
    state.step, state.history = ckpt["step"], ckpt["history"]
    state.stats, state.stop_reason = ckpt["stats"], ckpt["stop_reason"]
    state.accumulation = ckpt.get("accumulation")  # absent from checkpoints before it existed


# --- sampling and one update ---------------------------------------------------------------


def autocast(cfg: PPOConfig, device: torch.device):
    """bf16/fp16 autocast on CUDA when configured; a no-op elsewhere."""
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def attention_backends(cfg: PPOConfig, device: torch.device):
    """On CUDA with ``cfg.cudnn_attention`` off (see there), SDPA without cuDNN's kernel:
    flash, memory-efficient and math remain, tried in torch's order. A no-op otherwise. Sets torch's
    process-wide backend flags for the block and restores them after."""
    if device.type != "cuda" or cfg.cudnn_attention:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def grad_scaler(cfg: PPOConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 on CUDA: fp16's narrow range underflows small gradients (bf16
    has fp32's range and needs none)."""
    if device.type == "cuda" and cfg.mixed_precision == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


def decode_cache(cfg: PPOConfig, model: torch.nn.Module, device: torch.device) -> str:
    """The KV cache ``cfg.decode_cache`` names, with ``auto`` decided on a CUDA device without
    LoRA: graphs where our loop can capture the model's step (``graph_decodable``), static
    where only transformers can compile it; dynamic on CPU, with LoRA, or for other models."""
    if cfg.decode_cache != "auto":
        return cfg.decode_cache
    if device.type != "cuda" or cfg.lora is not None:
        return "dynamic"
    if graph_decodable(model):
        return "graphs"
    return "static" if getattr(model, "_can_compile_fullgraph", False) else "dynamic"


def width_multiple(cfg: PPOConfig, device: torch.device) -> int:
    """``cfg.width_multiple``, with None decided: 16 on CUDA, where every new token width
    costs set-up (see there), 1 (exact widths) elsewhere."""
    if cfg.width_multiple is not None:
        return cfg.width_multiple
    return 16 if device.type == "cuda" else 1


def phase_clock(device: torch.device) -> float:
    """perf_counter after the device's queued work is done: CUDA runs asynchronously, so
    without the sync a phase's time would land in whichever phase next waits on the GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def make_rollout(cfg: PPOConfig, models: PPOModels, prompts: list[list[int]], *,
                 beta: float, dp: DataParallel | None = None,
                 timings: dict[str, float] | None = None) -> Rollout:
    """Sample responses, then score them: log-probs, reference log-probs, values, rewards.
    With ``dp``, ``prompts`` are this process's share and whitening uses the whole batch.

    ``timings``, when given, receives the seconds of the two phases (``generation_s``,
    ``scoring_s``: the reference, critic and reward-model forwards)."""
    whiten = dp.masked_whiten if dp is not None else masked_whiten
    tok = models.tokenizer
    t0 = phase_clock(models.device) if timings is not None else 0.0
    query_ids, query_mask = pad_sequences(prompts, tok.pad_token_id, left=True)  # (B, P)
    query_ids, query_mask = query_ids.to(models.device), query_mask.to(models.device)
    cache = decode_cache(cfg, models.policy, models.device)
    response, rmask, ended, logp = generate(  # (B, T) each, ended (B,)
        models.policy, query_ids, query_mask, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, with_logprobs=True,
        static_cache_len=(cfg.max_prompt_length + cfg.max_new_tokens
                          if cache in ("static", "graphs") else None),
        graph_decode=cache == "graphs")
    if timings is not None:
        t1 = phase_clock(models.device)
        timings["generation_s"] = t1 - t0
    # Response columns up to the width bucket (cfg.width_multiple), all padding: sampling
    # stops when every row has ended, at any width.
    m = width_multiple(cfg, models.device)
    T = round_width(response.shape[1], m, cfg.max_new_tokens)
    response, rmask, logp = (pad_columns(x, T, v) for x, v in (
        (response, tok.pad_token_id), (rmask, 0.0), (logp, 0.0)))
    # (B, L) episodes back to back, left-padded: no padding between prompt and response.
    ids, attn = left_pad_episodes(query_ids, query_mask, response, rmask, multiple=m)
    with models.reference_view() as ref:
        ref_logp = response_logprobs(ref, ids, attn, response, cfg.temperature,
                                     response_mask=rmask)  # (B, T)
    values = response_values(models.critic, ids, attn, response.shape[1],
                             response_mask=rmask).float()  # (B, T)
    with models.reward_model_view() as rm:
        scores = models.reward_norm.normalize(score_sequences(rm, ids, attn).float())  # (B,)
    if cfg.reward_clip is not None:
        scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).float()
    if timings is not None:
        timings["scoring_s"] = phase_clock(models.device) - t1
    ro = Rollout(query_ids, query_mask, response, rmask, ended, logp, ref_logp, values, scores)
    ro.rewards, ro.kl = compute_rewards(scores, logp, ref_logp, rmask,
                                        beta if cfg.kl_in_reward else 0.0, cfg.kl_estimator)
    if not cfg.kl_in_reward:  # KL still reported as k1, the unbiased estimate
        ro.kl = kl_estimate(logp, ref_logp, "k1") * rmask
    rewards = whiten(ro.rewards, rmask, shift_mean=False) if cfg.whiten_rewards else ro.rewards
    ro.advantages, ro.returns = compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        ro.advantages = whiten(ro.advantages, rmask)
    return ro


def local_accumulation(cfg: PPOConfig, world: int) -> int:
    """Micro-batches per mini-batch in each of ``world`` processes: they share the
    ``gradient_accumulation_steps`` micro-batches (at least one each), so a micro-batch (the
    memory of one forward pass) is never larger than in one process. When ``world`` divides
    it, the mean of the micro-batch losses is the one-process loss, micro-batch for
    micro-batch (tests/test_multigpu.py checks the weights against one process)."""
    return max(1, cfg.gradient_accumulation_steps // world)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_``, minus its multiply when it would not clip.

    torch scales every gradient by min(1, max_norm / (norm + 1e-6)) even when that is 1.0:
    one multiply per parameter tensor (58 kernels a step on the demo model, ~5 % of an
    update's ops on CPU, where grad norms sit below 1.0 most steps). x * 1.0 is exact, so
    skipping it changes no bit; the coefficient is computed as torch computes it (see
    torch/nn/utils/clip_grad.py, ``_clip_grads_with_norm_``). The check reads one scalar, so
    only on CPU: on a GPU torch's unconditional multiply avoids that synchronisation (its
    own comment there says so) and costs one fused kernel.
    """
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if total.device.type != "cpu" or float(max_norm / (total + 1e-6)) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def next_accumulation(mini: int, accum: int) -> int | None:
    """The next number of micro-batches to split a mini-batch of ``mini`` episodes into after
    ``accum`` ran out of memory: the smallest divisor of ``mini`` above ``accum`` (equal
    micro-batches, so the mean of their losses weighs each alike), None when each
    micro-batch is already one episode."""
    return next((d for d in range(accum + 1, mini + 1) if mini % d == 0), None)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # One compiled wrapper per function for the process: dynamo's graphs hang off the
    # function's code and are guarded on the model passed, so policy and critic get their
    # own. dynamic=True: mini-batches differ in width, and each new width would otherwise
    # compile again (sizes 0 and 1 are still specialised). Inductor's coalesce tiling
    # analysis, which its config says does not yet apply to dynamic shapes, asserted in
    # get_pw_red_splits compiling the 1.2 B GPT-2's update on an H100 (torch 2.11; the same
    # failure and switch in roboflow/rf-detr#1455, pytorch/pytorch#197077); off, inductor
    # picks tilings as it does for dynamic shapes anyway.
    return torch.compile(fn, dynamic=True, options={"triton.coalesce_tiling_analysis": False})


def update_forward(cfg: PPOConfig, fn: Callable) -> Callable:
    """``fn`` (a forward the update differentiates), compiled with ``cfg.compile_update``."""
    return _compiled(fn) if cfg.compile_update else fn


def policy_part(cfg: PPOConfig, models: PPOModels, mb: Rollout, ids: torch.Tensor,
                attn: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy's share of a micro-batch's loss (clipped surrogate, entropy bonus, and the
    KL term when KL is a loss), and its stats."""
    with autocast(cfg, ids.device):
        logp, ent = update_forward(cfg, response_logprobs)(
            models.policy, ids, attn, mb.response_ids, cfg.temperature, with_entropy=True,
            entropy_grad=cfg.ent_coef != 0, response_mask=mb.response_mask)
    pl = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, cfg.clip_range)
    entropy = masked_mean(ent, mb.response_mask)
    loss = pl.loss - cfg.ent_coef * entropy
    if not cfg.kl_in_reward:  # KL as a loss term (k3 by default, GRPO style)
        kl_term = masked_mean(kl_estimate(logp, mb.ref_logprobs, cfg.kl_estimator),
                              mb.response_mask)
        loss = loss + beta * kl_term
    return loss, {"policy/clipfrac": pl.clipfrac, "policy/approx_kl": pl.approx_kl,
                  "policy/entropy": entropy, "loss/policy": pl.loss}


def critic_part(cfg: PPOConfig, models: PPOModels, mb: Rollout, ids: torch.Tensor,
                attn: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The critic's share of a micro-batch's loss (vf_coef x the clipped value loss), and its
    stats."""
    with autocast(cfg, ids.device):
        vpred = update_forward(cfg, response_values)(
            models.critic, ids, attn, mb.response_ids.shape[1],
            response_mask=mb.response_mask).float()
    vl, vclip = value_loss(vpred, mb.values, mb.returns, mb.response_mask, cfg.clip_range_value)
    return cfg.vf_coef * vl, {"loss/value": vl, "val/clipfrac": vclip}


def _critic_backward(cfg: PPOConfig, models: PPOModels, mb: Rollout, ids: torch.Tensor,
                     attn: torch.Tensor, accum: int) -> dict[str, torch.Tensor]:
    loss, stats = critic_part(cfg, models, mb, ids, attn)
    (loss / accum).backward()
    return stats


def rows_to(idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Row indices from the host onto ``device`` without waiting for it. A plain copy from
    pageable host memory to a GPU makes torch synchronise the stream after it: the host
    would wait for all queued work (the last optimizer step: ~30 ms of memory traffic at
    1.2 B, bench/README.md) before issuing the next micro-batch, every micro-batch. From
    pinned memory the copy is queued like a kernel (torch keeps the pinned block until the
    copy has run)."""
    if device.type != "cuda":
        return idx.to(device)
    return idx.pin_memory().to(device, non_blocking=True)


def accumulate_grads(cfg: PPOConfig, models: PPOModels, ro: Rollout, rows: torch.Tensor,
                     accum: int, *, beta: float, lengths: torch.Tensor,
                     episode_lengths: torch.Tensor, scaler: torch.amp.GradScaler | None = None,
                     critic_thread: SideThread | None = None) -> dict[str, list[torch.Tensor]]:
    """Forward and backward over the mini-batch ``rows`` of ``ro`` in ``accum`` equal
    micro-batches, gradients summed into ``.grad`` (each micro-batch's loss over ``accum``);
    returns the micro-batches' stats, still on the device. ``lengths`` / ``episode_lengths``
    (B,) on the host: real response / prompt + response tokens per row of ``ro``.

    With ``critic_thread`` the critic's part runs there, with a backward of its own, while
    this thread does the policy's: the same gradients when the two share no weights (each
    weight's gradient then comes from one part only), so only then (``critic_beside_policy``)."""
    stats: dict[str, list[torch.Tensor]] = {}
    micro = len(rows) // accum
    multiple = width_multiple(cfg, ro.response_ids.device)
    for m in range(0, len(rows), micro):
        idx = rows[m:m + micro]
        width = round_width(max(int(lengths[idx].max()), 1), multiple, ro.response_ids.shape[1])
        mb = ro.select(rows_to(idx, ro.response_ids.device), width=width)
        ids, attn = mb.episodes(width=int(episode_lengths[idx].max()), multiple=multiple)  # (B, L)
        if critic_thread is not None:
            critic_thread.submit(_critic_backward, cfg, models, mb, ids, attn, accum)
            try:
                loss, parts = policy_part(cfg, models, mb, ids, attn, beta)
                (loss / accum).backward()
            finally:  # collected even when the policy's part failed: no critic work left going
                critic_stats = critic_thread.result()
            parts |= critic_stats
        else:
            p_loss, parts = policy_part(cfg, models, mb, ids, attn, beta)
            v_loss, v_stats = critic_part(cfg, models, mb, ids, attn)
            parts |= v_stats
            scaled = (p_loss + v_loss) / accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        for k, v in parts.items():
            stats.setdefault(k, []).append(v.detach())
    return stats


@contextlib.contextmanager
def critic_beside_policy(cfg: PPOConfig, models: PPOModels, world: int
                         ) -> Iterator[SideThread | None]:
    """A thread for the critic's part of an update's micro-batches (``cfg.critic_thread``),
    where it helps and gives the same gradients: on CPU, in one process, with 2+ torch
    threads, and a critic that shares no trained weight with the policy. Within the block
    the calling thread runs on the other half of the threads. Yields None elsewhere."""
    threads = torch.get_num_threads()
    if (not cfg.critic_thread or models.device.type != "cpu" or world != 1 or threads < 2
            or _critic_shares_weights(models)):
        yield None
        return
    side = SideThread(half_threads(threads), name="ppo-critic")
    try:
        with intra_op_threads(side.threads):
            yield side
    finally:
        side.close()


def _critic_shares_weights(models: PPOModels) -> bool:
    """Whether a trained weight of the critic is also the policy's (a shared trunk)."""
    policy_params = {id(p) for p in models.policy.parameters() if p.requires_grad}
    return any(id(p) in policy_params for p in models.critic.parameters())


def ppo_update(cfg: PPOConfig, models: PPOModels, ro: Rollout, *, beta: float,
               optimizer: torch.optim.Optimizer, gen: torch.Generator,
               scaler: torch.amp.GradScaler | None = None,
               dp: DataParallel | None = None, accumulation: int | None = None
               ) -> dict[str, float]:
    """ppo_epochs passes of minibatch SGD on one rollout batch; returns averaged stats.

    With ``dp``, ``ro`` is this process's share of the batch and each optimiser step sees
    ``mini_batch_size / world_size`` of its episodes, gradients averaged over processes: the
    same number of steps, each over ``mini_batch_size`` episodes in all.

    ``accumulation``: micro-batches per mini-batch (default: from the config). With
    ``auto_micro_batch`` a mini-batch that runs out of GPU memory is redone in the next
    finer split (``next_accumulation``), kept for the rest of the update; the stats report
    the split used last as ``perf/accumulation``.

    On CPU the critic's forward and backward run in a thread of their own beside the
    policy's (``critic_beside_policy``).
    """
    # Stats stay on the device until the end: reading each one as it is made would make the
    # host wait for the GPU at every micro-batch, leaving the GPU idle while the host then
    # prepares the next one. Likewise the response lengths are read once, not per micro-batch.
    stats: dict[str, list[torch.Tensor]] = {}
    world = dp.world_size if dp is not None else 1
    B = ro.response_ids.shape[0]
    mini = cfg.mini_batch_size // world
    accum = accumulation or local_accumulation(cfg, world)
    params = models.trainable_params()
    lengths = ro.response_mask.sum(1).cpu()  # (B,) real response tokens per row
    episode_lengths = lengths + ro.query_mask.sum(1).cpu()  # (B,) prompt + response
    with critic_beside_policy(cfg, models, world) as critic_thread:
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B, generator=gen)
            for start in range(0, B, mini):
                while True:
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        grads_stats = accumulate_grads(
                            cfg, models, ro, perm[start:start + mini], accum, beta=beta,
                            lengths=lengths, episode_lengths=episode_lengths, scaler=scaler,
                            critic_thread=critic_thread)
                        break
                    except torch.OutOfMemoryError:
                        if not cfg.auto_micro_batch:
                            raise
                    # Outside the except clause: the exception's frames (and the activations
                    # they hold) are gone, so the memory is free before the finer retry.
                    accum = _after_out_of_memory(mini, accum, optimizer)
                for k, v in grads_stats.items():
                    stats.setdefault(k, []).extend(v)
                if dp is not None:  # before unscaling and clipping: all processes agree on both
                    dp.average_grads_(params)
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
                stats.setdefault("policy/grad_norm", []).append(grad_norm.detach())
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
    out = {k: sum(float(x) for x in v) / len(v) for k, v in stats.items()}
    out["perf/accumulation"] = float(accum)
    return out


def _after_out_of_memory(mini: int, accum: int, optimizer: torch.optim.Optimizer) -> int:
    """Free what the failed attempt left and return the next split (or raise: none left)."""
    import gc

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    finer = next_accumulation(mini, accum)
    if finer is None:
        raise torch.OutOfMemoryError(
            f"ppo: out of memory with micro-batches of one episode (mini-batch {mini}, "
            f"auto_micro_batch): a single sequence's forward and backward do not fit; try "
            f"gradient_checkpointing, LoRA, or a shorter max_new_tokens")
    log.warning("ppo: out of memory in a mini-batch of %d episodes as %d micro-batch(es) of "
                "%d; redoing it as %d of %d", mini, accum, mini // accum, finer, mini // finer)
    return finer


def rollout_metrics(ro: Rollout, beta: float) -> dict[str, float]:
    """What one batch says about the policy: KL drift, scores, critic fit, response lengths."""
    seq_kl = ro.kl.sum(1)  # (B,) KL to the reference per sequence
    return {
        "objective/kl": float(seq_kl.mean()), "objective/kl_max_seq": float(seq_kl.max()),
        "objective/kl_coef": beta, "objective/scores": float(ro.scores.mean()),
        "objective/rlhf_reward": float((ro.scores - beta * seq_kl).mean()),
        "objective/non_score_reward": float((-beta * seq_kl).mean()),
        "val/explained_variance": explained_variance(ro.values, ro.returns, ro.response_mask),
        "val/mean": float(masked_mean(ro.values, ro.response_mask)),
        "episode/length": float(ro.response_mask.sum(1).mean()),
        "episode/eos_rate": float(ro.ended_with_eos.float().mean()),
    }


class NonFiniteError(RuntimeError):
    """A loss, reward or advantage became NaN or inf: training stops there, naming the step,
    rather than saving weights that a NaN has already reached (the stage fails, so nothing is
    evaluated, registered or promoted)."""


# Losses, rewards and advantages must be finite. Not every stat: explained variance is NaN by
# definition when the returns do not vary (models/ppo.py), and that is a measurement.
MUST_BE_FINITE = ("loss/policy", "loss/value", "policy/grad_norm", "objective/kl",
                  "objective/scores")


def check_finite(step: int, ro: Rollout | None = None,
                 stats: dict[str, float] | None = None) -> None:
    """Raise NonFiniteError naming ``step`` and what is not finite (rollout tensors first:
    they say where a NaN came from, the losses only that it arrived)."""
    bad = []
    if ro is not None:
        for name in ("scores", "rewards", "advantages"):
            t = getattr(ro, name)
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} of {t.numel()} values)")
    for k in MUST_BE_FINITE:
        if stats is not None and k in stats and not math.isfinite(stats[k]):
            bad.append(f"{k} = {stats[k]}")
    if bad:
        raise NonFiniteError(f"ppo: non-finite {', '.join(bad)} at step {step}: stopping "
                             f"before the update is saved (check the reward model's outputs "
                             f"and the learning rate)")


# --- the loop ------------------------------------------------------------------------------


def train_ppo(cfg: PPOConfig, models: PPOModels, *, prompts: list[list[int]], seed: int,
              checkpoint: Path | None = None,
              log_fn: Callable[[dict[str, float], int], None] | None = None,
              dp: DataParallel | None = None) -> dict:
    """Run PPO to ``total_episodes``; resume from ``checkpoint`` when it exists.

    With ``dp`` (a data-parallel launch) every process draws the same batch of prompts and
    takes its share; statistics are reduced over processes, so every process adapts beta and
    stops alike; only the main process logs and writes the checkpoint.
    Returns a summary: steps done, whether it stopped early and why, the last stats.
    """
    from tqdm.auto import tqdm

    dp = dp or DataParallel(0, 1, models.device)
    world = dp.world_size
    if cfg.mini_batch_size % cfg.gradient_accumulation_steps or cfg.batch_size % cfg.mini_batch_size:
        raise ValueError("ppo: batch_size must be a multiple of mini_batch_size, and "
                         "mini_batch_size of gradient_accumulation_steps")
    accum = local_accumulation(cfg, world)
    if cfg.mini_batch_size % world or (cfg.mini_batch_size // world) % accum:
        raise ValueError(f"ppo: mini_batch_size {cfg.mini_batch_size} must split evenly over "
                         f"{world} processes, each share into {accum} micro-batches")
    if cfg.auto_micro_batch and world > 1:
        # One process running out of memory would split alone while the others wait for its
        # gradients in the all-reduce: every process must use the same split.
        raise ValueError(f"ppo: auto_micro_batch works in one process, not {world}: set "
                         f"gradient_accumulation_steps for a launch")
    device = models.device
    n_updates = max(1, cfg.total_episodes // cfg.batch_size)
    state = init_train_state(cfg, models, prompts, seed, n_updates)
    scaler = grad_scaler(cfg, device)
    # Each process samples with its own noise (rank 0 keeps the single-process seed).
    torch.manual_seed(seed + 1000003 * dp.rank)
    if checkpoint is not None and checkpoint.exists():
        restore_checkpoint(checkpoint, models, state, dp)
    dp.broadcast_(models.trainable_params())  # identical weights everywhere, as DDP ensures

    first = state.step if state.stop_reason is None else n_updates  # a stopped run stays stopped
    bar = tqdm(range(first, n_updates), desc="ppo", initial=state.step, total=n_updates,
               disable=not dp.is_main)
    for update in bar:
        t0 = time.perf_counter()
        beta = state.kl_ctl.value
        models.train(False)  # no dropout while sampling and scoring (Huang et al.)
        # Every process draws the whole batch (one sampler state, checkpointed once) and
        # keeps its share: together they sample the prompts one process would.
        prompts_here = dp.share(state.sampler.next_batch(cfg.batch_size), "prompts per batch")
        phases: dict[str, float] = {}
        with autocast(cfg, device), attention_backends(cfg, device):
            ro = make_rollout(cfg, models, prompts_here, beta=beta, dp=dp, timings=phases)
        t_update = time.perf_counter()
        models.train()
        with attention_backends(cfg, device):
            stats = ppo_update(cfg, models, ro, beta=beta, optimizer=state.optimizer,
                               gen=state.gen, scaler=scaler, dp=dp,
                               accumulation=state.accumulation)
        state.accumulation = int(stats["perf/accumulation"])
        state.scheduler.step()
        stats.update(rollout_metrics(ro, beta))  # reads the update's stats: the device is done
        stats["perf/tokens"] = float(ro.response_mask.sum())
        # Shares are equally large: the mean over processes is the batch's mean. Per-process
        # explained variance is averaged, not recomputed on the whole batch (a diagnostic).
        stats = dp.mean_stats(stats, max_keys=("objective/kl_max_seq",))
        # After the all-reduce: a NaN in any process's share reaches every process's stats,
        # so all of them stop together (one stopping alone would hang the others).
        check_finite(update + 1, ro=ro, stats=stats)
        elapsed = time.perf_counter() - t0
        # Per-phase seconds and shapes: enough to count each phase's FLOPs afterwards
        # (bench/device/bench_gpu.py reports model-FLOPs utilisation from them).
        stats.update({"perf/episodes_per_s": cfg.batch_size / elapsed,
                      "perf/tokens_per_s": stats.pop("perf/tokens") * world / elapsed,
                      "perf/generation_share": phases["generation_s"] / elapsed,
                      "perf/generation_s": phases["generation_s"],  # this process's phases
                      "perf/scoring_s": phases["scoring_s"],
                      "perf/update_s": time.perf_counter() - t_update,
                      "perf/prompt_width": float(ro.query_ids.shape[1]),
                      "perf/response_width": float(ro.response_ids.shape[1]),
                      "lr": state.scheduler.get_last_lr()[0]})
        mean_kl, score = stats["objective/kl"], stats["objective/scores"]
        state.kl_ctl.update(mean_kl, cfg.batch_size)  # the same reduced KL in every process
        state.step, state.stats = update + 1, stats
        state.history.append({"step": state.step, "kl": mean_kl, "score": score})
        bar.set_postfix(kl=f"{mean_kl:.2f}", score=f"{score:.2f}")
        if log_fn is not None and dp.is_main and (state.step % cfg.log_every == 0
                                                  or state.step == n_updates):
            log_fn({f"ppo/{k}": v for k, v in stats.items()}, state.step)
        if cfg.kl_budget is not None and mean_kl > cfg.kl_budget:
            state.stop_reason = (f"KL {mean_kl:.2f} nats exceeded kl_budget {cfg.kl_budget} "
                                 f"at step {state.step}")
        if checkpoint is not None and (state.step % cfg.checkpoint_every == 0
                                       or state.step == n_updates or state.stop_reason):
            rank_rngs = dp.gather_object(rng_state())  # a collective: every process joins
            if dp.is_main:
                save_checkpoint(checkpoint, models, state, rank_rngs)
        if state.stop_reason:
            break
    bar.close()
    if state.stop_reason is None and state.step != n_updates:  # never report skipped steps as done
        raise RuntimeError(f"ppo: {state.step} of {n_updates} updates done, without a stop reason")
    return {"steps": state.step, "planned_steps": n_updates, "stop_reason": state.stop_reason,
            "final": state.stats, "history": state.history}
