"""PPO stage: our own PPO with a KL penalty to the frozen SFT policy (TRL 1.16 has none).

Roles as in OpenRLHF: actor (the policy, initialised from SFT), reference (frozen SFT),
critic (value model, initialised from the reward model or the SFT weights), reward model
(frozen, scores normalised with the mean/std saved by the reward stage). The math lives in
``models/ppo.py`` and the loop (rollout, update, checkpoints for resume) in
``tasks/ppo_trainer.py``; this module holds the config, loads the models and logs to MLflow.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.base import LoraSettings, PolicyResult, StageConfig, TrackingContext, peft_config

# torch, the models and the loop are imported where they are used: the config imports this
# module for ``PPOConfig``, and no ``rlhf`` command should pay for torch until a stage runs.


class PPOConfig(StageConfig):
    """PPO hyper-parameters; defaults follow Huang et al. 2024 and TRL's last PPOTrainer, for a
    ~0.5B SFT model on one GPU (configs/demo.yaml shows a tiny CPU model's settings)."""

    total_episodes: int = 16384
    """Episodes (sampled responses) in the whole stage; updates = total_episodes / batch_size."""
    batch_size: int = 64
    """Episodes per rollout batch (one PPO update), over all processes of a launch: each of
    N processes samples batch_size / N of them."""
    mini_batch_size: int = 16
    """Episodes per optimiser step within a PPO epoch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per mini-batch (mini_batch_size must divide evenly). Under ``accelerate
    launch`` with N processes each runs max(1, this / N) of them on its mini_batch_size / N
    episodes: a micro-batch is never larger than in one process."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    learning_rate: float = 3e-6
    """AdamW learning rate for policy and critic."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """Learning-rate schedule over updates: linear decay to 0 (Huang et al.) or constant."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    max_prompt_length: int = 512
    """Prompts longer than this keep their last tokens."""
    max_new_tokens: int = 128
    """Response length cap; responses that hit it without EOS are truncated."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    init_kl_coef: float = 0.05
    """Initial KL coefficient beta (TRL's old name); with ``adaptive_kl`` the controller moves it."""
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
    auto_micro_batch: bool = False
    """On a GPU out-of-memory error in a mini-batch, redo it in smaller micro-batches (the
    next divisor of mini_batch_size above gradient_accumulation_steps) and keep that split
    for the rest of the run (checkpointed; logged as ``ppo/perf/accumulation``): the largest
    micro-batch that fits, found by trying, as transformers' ``auto_find_batch_size`` does.
    One process only. The loss is then the mean over more, smaller micro-batches, as if that
    gradient_accumulation_steps had been set from the start."""
    gradient_checkpointing: bool = False
    """Recompute the policy's and critic's block activations in the backward pass instead of
    storing them: activation memory of one block instead of all, for about one more forward
    pass of compute per update (a third more). For models whose micro-batches do not fit;
    lowering the micro-batch (``gradient_accumulation_steps``) is the cheaper first step."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    """Autocast dtype for the trained models' forward passes on a GPU, over fp32 master weights
    (fp16 adds loss scaling); on CPU they run in fp32. ``bf16`` also holds the frozen models
    (reference, reward model; with LoRA on a GPU, the frozen bases) in bf16 weights, on any
    device: half the memory and no per-forward casts of weights that never change."""
    decode_cache: Literal["auto", "dynamic", "static", "graphs"] = "auto"
    """KV cache for sampling. ``graphs``: one pre-allocated cache of max_prompt_length +
    max_new_tokens, driven by our own loop (``models.rollout.decode_static``), whose step,
    sampling included, is captured as a CUDA graph on a GPU once per batch, with no compiler
    (the capture costs about one eager step); on CPU the same loop runs eagerly. ``static``:
    the same cache through ``model.generate``, which compiles the step with torch.compile
    (the first batch pays the compile: 14-20 s on an H200). ``dynamic``: a cache grown step
    by step, eager, dropping rows that have ended. ``auto``: on a GPU without LoRA, graphs for
    models our loop can drive (transformers compiles them whole, SDPA or eager attention, no
    sliding window: ``graph_decodable``), else static where transformers can compile, else
    dynamic; dynamic on CPU (no graphs there, and dropping ended rows pays) and with LoRA
    (unmeasured). Measured on H200s (bench/README.md, runs 7 and 8), against static: the
    first update 3.5-5.4 s against 22.9 s at 1.2 B, 2.1-6.9 s against 15.4 s at 86 M, and
    1.5-1.8x the decode tokens/s in steady updates."""
    cudnn_attention: bool = True
    """On a GPU, let torch pick cuDNN's attention kernel (its default on Hopper and Blackwell
    with a recent cuDNN); ``false`` leaves it out, so flash, memory-efficient or math attention
    run. Measured on H100s at 1.2 B, bf16, batch 64 (bench/README.md): with cuDNN the steady
    update phase took 2.29 s against 3.0-3.16 s and sampling 0.87-1.02 s against 1.24-1.26 s,
    but the first update took 39 s against 18 s (cuDNN's one-time set-up: its scoring forwards
    alone took 1.97 s against 0.21 s); a new prompt width cost about 0.2 s more. A run of more
    than about 20 updates gains; a short benchmark loses. At 86 M (12 heads of 64) on an
    H200 with graph decoding (run 8, one machine) cuDNN lost on both counts: the first update
    took 6.9 s against 2.1 s and the steady updates ran 85.9 against 98.3 episodes/s, so for
    models of that size set it false. At 1.2 B, batch 64 (run 9, one H200) its steady updates
    were no faster either, and its first update took 8.8 s against 3.3 s; the default stays
    torch's, because the 40 % MFU at batch 256-512 (run 5) was measured with it. No effect
    on CPU."""
    width_multiple: int | None = Field(default=None, ge=1)
    """Round the token widths the scoring and update forwards see (the longest response, the
    longest prompt + response) up to a multiple of this many tokens, with masked padding
    columns: fewer distinct shapes, each of which costs cuDNN's attention an execution plan
    the first time it is seen (and a compiled update a graph). Null: 16 on a GPU, 1 (exact
    widths, no padding) on CPU. Losses and updates are those of exact widths up to float
    summation order (tested). On an H200 (1.2 B, bf16; bench/README.md, run 6), exact
    widths cost 6.6-6.7 s update phases, against 2.5-2.8 s, in the two updates whose
    responses first shrank to new widths; with buckets of 16 a run has at most 8 response
    widths; run 7 (bucketed, another H200) took 1.4-1.9 s at its new widths of 16 and 32,
    without such spikes. ``ppo/perf/response_width`` logs the rounded width (the columns
    computed)."""
    critic_thread: bool = True
    """On CPU, run the critic's forward and backward in a second thread beside the policy's,
    each on half of torch's threads, when the critic has weights of its own (not
    ``critic_init: policy``), the run is one process and torch has 2 threads or more. The
    gradients are the same as running the two one after the other on that half (tested); the
    small ops of small models waste less time starting threads (bench/README.md)."""
    compile_update: bool = False
    """Compile the update's policy and critic forwards (and so their backwards) with
    ``torch.compile``, once per run, for every mini-batch width (dynamic shapes). For GPUs,
    where an eager update looks bound by the host: an H100 took about 156 ms per 1.2 B
    mini-batch step (16 episodes) and 64-75 ms at 86 M (32 episodes), nearly in proportion to
    the ~5,900 and ~3,100 ops each issues (24 and 12 layers), not to their 7x apart FLOPs
    (bench/README.md). Compiling fuses the elementwise ops and autocast's casts, and drops
    the mask checks by which transformers makes the host wait for the GPU in every forward.
    Costs a compile in the first update (minutes on CPU for a deep model); off by default
    until measured on a GPU. On CPU it runs beside ``critic_thread`` but is not faster. Its
    first GPU try (H100, torch 2.11, 1.2 B) failed after 147 s in the first graph's compile
    on an inductor assertion, which the trainer now switches off; not yet rerun there."""
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


def frozen_dtype(cfg: PPOConfig) -> torch.dtype:
    """Weights of the frozen models: bf16 with ``mixed_precision: bf16`` (they only run
    forward, and bf16 keeps fp32's range, so no scaling is needed), else fp32. fp16 is not
    used for weights: its range overflows on large activations without a scaler."""
    import torch

    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32


def trained_base_dtype(cfg: PPOConfig, device: torch.device) -> torch.dtype:
    """Weights of the policy and critic as loaded. fp32 (the master weights autocast reads)
    unless LoRA trains them on a GPU under bf16: then the base weights never change, only the
    adapters (peft keeps those in fp32) do, and autocast mixes the two dtypes. On CPU there is
    no autocast, so a bf16 base would meet fp32 adapters: it stays fp32."""
    import torch

    if cfg.lora is not None and cfg.mixed_precision == "bf16" and device.type == "cuda":
        return torch.bfloat16
    return torch.float32


def build_models(cfg: PPOConfig, sft_model_uri: str, reward_model_uri: str,
                 device: torch.device) -> PPOModels:
    """Policy and critic to train, reference and reward model frozen, with the SFT tokenizer
    and the reward stage's score normalisation. With LoRA the reference (and, with
    ``critic_init: reward``, the reward model) is None: the trained model's adapters off."""
    from models.loading import (disable_dropout, enable_gradient_checkpointing,
                                freeze_bottom_layers, load_causal_lm, load_sequence_scorer,
                                load_tokenizer, upcast_trainable)
    from models.reward import RewardNorm
    from models.rollout import SharedTrunkCritic
    from tasks.ppo_trainer import PPOModels

    tokenizer = load_tokenizer(sft_model_uri)
    pad_token_id = tokenizer.pad_token_id
    frozen, trained = frozen_dtype(cfg), trained_base_dtype(cfg, device)
    policy = load_causal_lm(sft_model_uri, dtype=trained)
    policy.config.pad_token_id = pad_token_id
    freeze_bottom_layers(policy, cfg.freeze_layers)
    critic = None
    if cfg.critic_init != "policy":
        critic = load_sequence_scorer(reward_model_uri if cfg.critic_init == "reward"
                                      else sft_model_uri, dtype=trained)
        critic.config.pad_token_id = pad_token_id
        freeze_bottom_layers(critic, cfg.freeze_layers)
    if cfg.gradient_checkpointing:  # before peft wraps them; a shared-trunk critic is the policy's
        for m in (policy, critic):
            if m is not None:
                enable_gradient_checkpointing(m)
    reference = reward_model = None
    if cfg.lora is None:
        reference = load_causal_lm(sft_model_uri, dtype=frozen)
    else:
        from peft import get_peft_model

        policy = get_peft_model(policy, peft_config(cfg.lora, "CAUSAL_LM"))
        if critic is not None:
            # modules_to_save: the scalar head trains fully; disabling adapters restores the
            # reward model's own head, so the RM can be the critic's base.
            critic = get_peft_model(critic, peft_config(cfg.lora, "SEQ_CLS", ["score"]))
        for m in (policy, critic):
            if m is not None:
                upcast_trainable(m)  # a bf16 base (GPU, bf16) trains fp32 adapters and head
    if critic is None:
        critic = SharedTrunkCritic(policy)
    if cfg.lora is None or cfg.critic_init != "reward":
        reward_model = load_sequence_scorer(reward_model_uri, dtype=frozen)
    for m in (reference, reward_model):
        if m is not None:
            m.config.pad_token_id = pad_token_id
            m.eval().requires_grad_(False)
    for m in (policy, critic):
        disable_dropout(m)
    policy, reference, critic, reward_model = (m if m is None else m.to(device) for m in
                                               (policy, reference, critic, reward_model))
    return PPOModels(policy=policy, reference=reference, critic=critic, reward_model=reward_model,
                     reward_norm=RewardNorm.load(reward_model_uri), tokenizer=tokenizer)


# --- the stage ---------------------------------------------------------------------------


def run_ppo(cfg: PPOConfig, *, sft_model_uri: str, reward_model_uri: str, prompts_uri: str,
            out_dir: str, seed: int, ctx: TrackingContext) -> PolicyResult | None:
    """Load actor/reference/critic/reward model, train, save the policy, log it all.

    Under ``accelerate launch`` every process trains its share of each batch; the main one
    saves, logs and returns the result, the others return None."""
    from transformers import set_seed

    from tasks.distributed import DataParallel
    from tasks.ppo_trainer import train_ppo

    dp = DataParallel.setup()
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        if os.environ.get(name, "").lower() == "true":
            # Our loop keeps whole weights in every process (data parallel, like DDP); a
            # ZeRO or FSDP accelerate config shards the TRL stages only.
            logging.getLogger(__name__).warning(
                "ppo: %s is set, but our PPO loop is plain data parallel: every process holds "
                "the whole policy, critic, reference and reward model", name)
    set_seed(seed)  # the same in every process: identical initial weights (LoRA, value head)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = build_models(cfg, sft_model_uri, reward_model_uri, dp.device)
    prompts = _load_prompts(prompts_uri, models.tokenizer, cfg.max_prompt_length)
    if not dp.is_main:  # trains its share; the main process checkpoints, saves and logs
        train_ppo(cfg, models, prompts=prompts, seed=seed, checkpoint=out / "checkpoint.pt",
                  dp=dp)
        return None

    import mlflow

    from tasks.tracking import log_metrics, save_policy, stage_run

    with stage_run(ctx, "policy", cfg, seed, algorithm="ppo") as run:
        summary = train_ppo(cfg, models, prompts=prompts, seed=seed,
                            checkpoint=out / "checkpoint.pt", log_fn=log_metrics, dp=dp)
        policy_dir = save_policy(models.policy, models.tokenizer, out,
                                 {"sft_model": sft_model_uri, "reward_model": reward_model_uri},
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
