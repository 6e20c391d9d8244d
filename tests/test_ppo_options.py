"""Each PPO option does what its docstring says, on the demo's tiny GPT-2 (seconds each)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from models.loading import load_sequence_scorer, load_tokenizer, transformer_blocks
from models.reward import RewardNorm
from tasks.ppo import PPOConfig, _load_prompts, build_models
from tasks.ppo_trainer import (autocast, grad_scaler, make_rollout, next_accumulation,
                               train_ppo)
from tasks.base import LoraSettings
from tasks.side_thread import intra_op_threads

BASE = "demo/base_model"
# Tiny-model settings (the defaults are for ~0.5B models on a GPU).
SMALL = dict(total_episodes=16, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8,
             learning_rate=3e-4, mixed_precision="no")


@pytest.fixture(scope="module")
def rm_dir(tiny_reward_dir):
    return tiny_reward_dir


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(BASE)


@pytest.fixture(scope="module")
def prompts(tok):
    return _load_prompts("demo/data/rl_prompts.jsonl", tok, 32)[:32]


def models_for(cfg: PPOConfig, rm_dir):
    return build_models(cfg, BASE, rm_dir, torch.device("cpu"))


def run(cfg: PPOConfig, rm_dir, prompts, seed=0, checkpoint=None):
    models, logs = models_for(cfg, rm_dir), []
    summary = train_ppo(cfg, models, prompts=prompts, seed=seed, checkpoint=checkpoint,
                        log_fn=lambda m, s: logs.append(m))
    return summary, logs, models


def rollout(cfg, rm_dir, prompts, seed=0):
    torch.manual_seed(seed)
    return make_rollout(cfg, models_for(cfg, rm_dir), prompts[:8], beta=cfg.init_kl_coef)


def test_default_run_logs_kl_drift_metrics(rm_dir, prompts):
    summary, logs, _ = run(PPOConfig(**SMALL), rm_dir, prompts)
    assert summary["steps"] == summary["planned_steps"] == 2 and summary["stop_reason"] is None
    for key in ("objective/kl", "objective/kl_max_seq", "objective/kl_coef", "policy/clipfrac",
                "policy/approx_kl", "val/explained_variance", "policy/entropy",
                "objective/scores", "objective/rlhf_reward", "perf/episodes_per_s",
                "perf/tokens_per_s"):
        assert f"ppo/{key}" in logs[-1], key


def test_adaptive_vs_fixed_kl_coef(rm_dir, prompts):
    _, logs, _ = run(PPOConfig(**SMALL, adaptive_kl=False, init_kl_coef=0.3), rm_dir, prompts)
    assert [m["ppo/objective/kl_coef"] for m in logs] == [0.3, 0.3]
    _, logs, _ = run(PPOConfig(**SMALL, init_kl_coef=0.3, kl_target=1e-6, kl_horizon=100),
                     rm_dir, prompts)
    # The first batch is sampled before any update: KL 0, below target, so beta shrinks by
    # the clipped error: beta * (1 - 0.2 * 8 / 100) is what the second update uses.
    assert logs[0]["ppo/objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert logs[1]["ppo/objective/kl_coef"] == pytest.approx(0.3 * 0.984)


def test_kl_in_reward_vs_kl_as_loss(rm_dir, prompts):
    in_reward = rollout(PPOConfig(**SMALL, init_kl_coef=1.0), rm_dir, prompts)
    # rewards sum to score - beta * sum(kl)
    assert torch.allclose(in_reward.rewards.sum(1), in_reward.scores - in_reward.kl.sum(1), atol=1e-5)
    as_loss = rollout(PPOConfig(**SMALL, init_kl_coef=1.0, kl_in_reward=False, kl_estimator="k3"),
                      rm_dir, prompts)
    assert torch.allclose(as_loss.rewards.sum(1), as_loss.scores, atol=1e-5)


def test_advantage_whitening(rm_dir, prompts):
    ro = rollout(PPOConfig(**SMALL), rm_dir, prompts)
    m = ro.response_mask.bool()
    assert ro.advantages[m].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert ro.advantages[m].std().item() == pytest.approx(1.0, abs=1e-3)
    raw = rollout(PPOConfig(**SMALL, whiten_advantages=False), rm_dir, prompts)
    assert abs(raw.advantages[m].std().item() - 1.0) > 1e-3


def test_reward_clip_and_missing_eos_penalty(rm_dir, prompts):
    big = RewardNorm(1.0, 0.0, 1e-3)  # scores * 1000: clipping must bite
    big_dir = rm_dir + "_big"
    import shutil

    shutil.copytree(rm_dir, big_dir, dirs_exist_ok=True)
    big.save(big_dir)
    ro = rollout(PPOConfig(**SMALL, reward_clip=2.0, missing_eos_penalty=None), big_dir, prompts)
    assert ro.scores.abs().max().item() <= 2.0
    # max_new_tokens=2: nearly every response is truncated without EOS.
    cfg = dict(SMALL, max_new_tokens=2)
    a = rollout(PPOConfig(**cfg, missing_eos_penalty=None), rm_dir, prompts, seed=1)
    b = rollout(PPOConfig(**cfg, missing_eos_penalty=3.0), rm_dir, prompts, seed=1)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.allclose(b.scores, a.scores - 3.0 * (~a.ended_with_eos).float())


def test_reward_whitening_keeps_scores_finite(rm_dir, prompts):
    summary, logs, _ = run(PPOConfig(**SMALL, whiten_rewards=True), rm_dir, prompts)
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(list(m.values()))).all()
                                         for m in logs)


def test_value_clipping_bites_in_a_run(rm_dir, prompts):
    """A tight value clip holds the critic back once it has moved (from the second minibatch
    on); without one nothing is clipped. The hand-checked loss is in test_ppo_math.py."""
    _, logs_on, on = run(PPOConfig(**SMALL, clip_range_value=1e-4), rm_dir, prompts)
    _, logs_off, off = run(PPOConfig(**SMALL, clip_range_value=None), rm_dir, prompts)
    assert max(m["ppo/val/clipfrac"] for m in logs_on) > 0.1
    assert all(m["ppo/val/clipfrac"] == 0.0 for m in logs_off)
    w = "score.weight"
    assert not torch.allclose(on.critic.state_dict()[w], off.critic.state_dict()[w])


def test_critic_initialisation(rm_dir, prompts):
    rm_state = load_sequence_scorer(rm_dir).state_dict()
    critic = models_for(PPOConfig(critic_init="reward"), rm_dir).critic
    assert torch.equal(critic.state_dict()["score.weight"], rm_state["score.weight"])
    models = models_for(PPOConfig(critic_init="sft"), rm_dir)
    assert not torch.equal(models.critic.state_dict()["score.weight"], rm_state["score.weight"])
    assert models.reward_model is not None  # the reward model stays a separate frozen model


def test_epochs_minibatches_and_accumulation(rm_dir, prompts):
    cfg = PPOConfig(**dict(SMALL, ppo_epochs=3, mini_batch_size=4, total_episodes=8),
                    gradient_accumulation_steps=2)
    models = models_for(cfg, rm_dir)
    steps = []
    opt_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        steps.append(1)
        return opt_step(self, *a, **k)

    torch.optim.AdamW.step = counting_step
    try:
        train_ppo(cfg, models, prompts=prompts, seed=0)
    finally:
        torch.optim.AdamW.step = opt_step
    assert len(steps) == 3 * (8 // 4)  # epochs x minibatches, accumulation inside each
    with pytest.raises(ValueError, match="multiple"):
        run(PPOConfig(**dict(SMALL, mini_batch_size=3)), rm_dir, prompts)


def test_entropy_bonus_changes_the_update(rm_dir, prompts):
    _, _, m0 = run(PPOConfig(**SMALL, ent_coef=0.0), rm_dir, prompts)
    _, _, m1 = run(PPOConfig(**SMALL, ent_coef=0.5), rm_dir, prompts)
    w = "lm_head.weight"
    assert not torch.allclose(m0.policy.state_dict()[w], m1.policy.state_dict()[w])


def test_learning_rate_schedule(rm_dir, prompts):
    _, logs, _ = run(PPOConfig(**dict(SMALL, total_episodes=24)), rm_dir, prompts)
    lrs = [m["ppo/lr"] for m in logs]
    assert lrs == pytest.approx([3e-4 * 2 / 3, 3e-4 / 3, 0.0])
    _, logs, _ = run(PPOConfig(**SMALL, lr_schedule="constant"), rm_dir, prompts)
    assert {m["ppo/lr"] for m in logs} == {3e-4}


def test_lora_shares_base_weights_for_reference_and_reward(rm_dir, prompts):
    cfg = PPOConfig(**SMALL, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    before = {k: v.clone() for k, v in load_sequence_scorer(rm_dir).state_dict().items()}
    summary, _, models = run(cfg, rm_dir, prompts)
    # no second copy of the policy or reward-model weights
    assert models.reference is None and models.reward_model is None
    assert summary["steps"] == 2
    base_params = {n: p for n, p in models.policy.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in base_params.values())
    lora_b = [p for n, p in models.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters trained (B starts at zero)
    # The reward-model view == the untouched reward model: same scalar head, same backbone.
    with models.reward_model_view() as rm:
        head = rm.base_model.model.score.original_module.weight
        assert torch.equal(head, before["score.weight"])


def test_freeze_layers(rm_dir, prompts):
    cfg = PPOConfig(**SMALL, freeze_layers=1)
    models = models_for(cfg, rm_dir)
    policy = models.policy
    frozen = {k: v.clone() for k, v in transformer_blocks(policy)[0].state_dict().items()}
    emb = policy.get_input_embeddings().weight.clone()
    train_ppo(cfg, models, prompts=prompts, seed=0)
    for k, v in transformer_blocks(policy)[0].state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert torch.equal(policy.get_input_embeddings().weight, emb)
    assert not torch.equal(transformer_blocks(policy)[1].state_dict()["attn.c_attn.weight"],
                           transformer_blocks(models.reference)[1].state_dict()["attn.c_attn.weight"])


@pytest.mark.parametrize("critic_init", ["reward", "policy"])
def test_gradient_checkpointing_recomputes_blocks_and_trains_alike(rm_dir, prompts, critic_init):
    """With checkpointing every block runs forward twice per training micro-batch (once more
    in the backward pass), never while sampling or scoring, and the weights come out as
    without it: recomputation repeats the same arithmetic."""
    cfg = PPOConfig(**SMALL, critic_init=critic_init)
    _, _, plain = run(cfg, rm_dir, prompts)
    ckpt_cfg = cfg.model_copy(update={"gradient_checkpointing": True})
    models = models_for(ckpt_cfg, rm_dir)
    calls = {"train": 0, "eval": 0}
    # Counted in a part's forward itself: transformers checkpoints the block's forward, and
    # torch's recomputation runs forwards without their modules' hooks.
    mlp = transformer_blocks(models.policy)[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls["train" if mlp.training else "eval"] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    train_ppo(ckpt_cfg, models, prompts=prompts, seed=0)
    # 2 updates x 1 epoch x 2 micro-batches; the policy forward, plus the critic's with a
    # shared trunk, each recomputed once in the backward pass.
    forwards = 2 * 2 * (2 if critic_init == "policy" else 1)
    assert calls["train"] == 2 * forwards
    assert calls["eval"] > 0  # sampling and scoring ran the block, without recomputation
    for a, b in zip(plain.policy.parameters(), models.policy.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.critic.parameters(), models.critic.parameters()):
        assert torch.equal(a, b)


def test_critic_thread_trains_as_one_thread_would(rm_dir, prompts, monkeypatch):
    """On 2 threads the critic's forward and backward run in a thread of their own, each side
    on 1 intra-op thread: the weights equal a run whose updates do both parts one after the
    other on 1 thread, bit for bit (each weight's gradient comes from one part). Not with a
    critic on the policy's trunk, and torch's thread count is back afterwards."""
    import tasks.ppo_trainer as trainer

    cfg = PPOConfig(**dict(SMALL, gradient_accumulation_steps=2))
    update = trainer.ppo_update

    def update_on_one_thread(*args, **kwargs):
        with intra_op_threads(1):
            return update(*args, **kwargs)

    with monkeypatch.context() as patch, intra_op_threads(2):
        patch.setattr(trainer, "ppo_update", update_on_one_thread)
        _, _, alone = run(cfg.model_copy(update={"critic_thread": False}), rm_dir, prompts)
    where, models = {"policy": set(), "critic": set()}, models_for(cfg, rm_dir)
    for role in where:  # the critic's trunk is called without its head's forward
        transformer_blocks(getattr(models, role))[0].register_forward_pre_hook(
            lambda m, a, role=role: where[role].add(threading.current_thread().name) if m.training
            else None)
    with intra_op_threads(2):
        train_ppo(cfg, models, prompts=prompts, seed=0)
        assert torch.get_num_threads() == 2
    assert where == {"policy": {"MainThread"}, "critic": {"ppo-critic"}}
    for role in ("policy", "critic"):
        for a, b in zip(getattr(alone, role).parameters(), getattr(models, role).parameters()):
            assert torch.equal(a, b), role

    shared = models_for(cfg.model_copy(update={"critic_init": "policy"}), rm_dir)
    names = set()
    transformer_blocks(shared.policy)[0].register_forward_pre_hook(
        lambda m, a: names.add(threading.current_thread().name))
    with intra_op_threads(2):
        train_ppo(cfg.model_copy(update={"critic_init": "policy"}), shared, prompts=prompts,
                  seed=0)
    assert names == {"MainThread"}


def test_critic_thread_failure_reaches_the_update(rm_dir, prompts):
    """An error in the critic's thread is raised by the update, after the policy's part has
    finished: a staged out-of-memory error in the critic is redone by auto_micro_batch."""
    cfg = PPOConfig(**SMALL, auto_micro_batch=True)
    models, logs = models_for(cfg, rm_dir), []
    fail_training_forwards_over(models, rows=2, role="critic")
    with intra_op_threads(2):
        summary = train_ppo(cfg, models, prompts=prompts, seed=0,
                            log_fn=lambda m, s: logs.append(m))
    assert summary["steps"] == 2 and [m["ppo/perf/accumulation"] for m in logs] == [2.0, 2.0]


def test_compiled_update_trains_as_the_eager_one(rm_dir, prompts):
    """compile_update: the update's forwards (and backwards) run as compiled graphs, one per
    model for every mini-batch width, with the critic in its own thread too, and train to the
    eager run's weights up to float summation order. Sampling and scoring stay eager."""
    import torch._dynamo

    cfg = PPOConfig(**dict(SMALL, total_episodes=8))
    with intra_op_threads(2):
        _, eager_logs, eager = run(cfg, rm_dir, prompts)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        _, logs, compiled = run(cfg.model_copy(update={"compile_update": True}), rm_dir,
                                prompts)
    # the policy's and the critic's forward, each once, whatever the widths of the two
    # mini-batches (dynamic shapes); nothing compiled for sampling or scoring
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
    for role in ("policy", "critic"):
        for (name, a), b in zip(getattr(eager, role).named_parameters(),
                                getattr(compiled, role).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{role} {name}")
    assert logs[0]["ppo/loss/value"] == pytest.approx(eager_logs[0]["ppo/loss/value"], rel=1e-4)


def test_width_buckets_pad_the_forwards_and_train_alike(rm_dir, prompts, monkeypatch):
    """width_multiple: every scoring and update forward reads a width rounded up to the bucket
    (masked columns; responses padded up to it too), and the update trains to the exact-width
    run's weights up to float summation order. Null: 16 on CUDA, exact widths on CPU."""
    from tasks import ppo_trainer
    from tasks.ppo_trainer import width_multiple

    sample = ppo_trainer.generate

    def five_tokens(*args, **kwargs):  # as if every row had ended by its 5th token (of 8)
        return tuple(x[:, :5] if x.dim() == 2 else x for x in sample(*args, **kwargs))

    monkeypatch.setattr(ppo_trainer, "generate", five_tokens)
    assert width_multiple(PPOConfig(), torch.device("cuda")) == 16
    assert width_multiple(PPOConfig(), torch.device("cpu")) == 1
    cfg = PPOConfig(**dict(SMALL, total_episodes=8))  # one update: both runs sample alike
    runs = {}
    for multiple in (None, 4):
        run_cfg = cfg.model_copy(update={"width_multiple": multiple})
        models, logs, seen = models_for(run_cfg, rm_dir), [], []
        # the critic's forwards: scoring's values and the update's (it takes no part in sampling)
        transformer_blocks(models.critic)[0].register_forward_pre_hook(
            lambda block, args, kwargs: seen.append(
                (args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
        train_ppo(run_cfg, models, prompts=prompts, seed=0, log_fn=lambda m, s: logs.append(m))
        runs[multiple] = models, logs, seen
    # episode widths: the critic reads every column but the last (the state after the end)
    exact, bucketed = [w + 1 for w in runs[None][2]], [w + 1 for w in runs[4][2]]
    assert any(w % 4 for w in exact)  # else the buckets below would prove nothing
    assert all(w % 4 == 0 for w in bucketed) and len(bucketed) == len(exact)
    assert all(b >= e for b, e in zip(bucketed, exact))
    assert [r[1][0]["ppo/perf/response_width"] for r in runs.values()] == [5, 8]
    for role in ("policy", "critic"):
        for (name, a), b in zip(getattr(runs[None][0], role).named_parameters(),
                                getattr(runs[4][0], role).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{role} {name}")
    for key in ("ppo/loss/value", "ppo/loss/policy", "ppo/objective/kl", "ppo/objective/scores"):
        assert runs[4][1][0][key] == pytest.approx(runs[None][1][0][key], rel=1e-4, abs=1e-6)


def test_attention_without_cudnn_on_cuda_only():
    """On CUDA with ``cudnn_attention: false`` the PPO loop's attention leaves cuDNN's kernel
    out, keeping flash, memory-efficient and math; by default and elsewhere nothing changes.
    torch's flags are set for the block and restored after (they exist on CPU builds)."""
    from tasks.ppo_trainer import attention_backends

    flags = (torch.backends.cuda.cudnn_sdp_enabled, torch.backends.cuda.flash_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [f() for f in flags]
    assert before == [True] * 4
    with attention_backends(PPOConfig(cudnn_attention=False), torch.device("cuda")):
        assert [f() for f in flags] == [False, True, True, True]
    assert [f() for f in flags] == before
    for cfg, device in ((PPOConfig(), "cuda"), (PPOConfig(cudnn_attention=False), "cpu")):
        with attention_backends(cfg, torch.device(device)):
            assert [f() for f in flags] == before


def test_next_accumulation_is_the_next_even_split():
    assert [next_accumulation(16, a) for a in (1, 2, 4, 8, 16)] == [2, 4, 8, 16, None]
    assert [next_accumulation(12, a) for a in (1, 2, 3, 4, 6, 12)] == [2, 3, 4, 6, 12, None]
    assert next_accumulation(7, 1) == 7  # a prime mini-batch: one episode per micro-batch


def fail_training_forwards_over(models, rows: int, role: str = "policy"):
    """Make the training forward of ``role`` (policy or critic) raise CUDA's out-of-memory
    error on more than ``rows`` episodes: the memory limit of a GPU, staged on CPU (where
    none can be hit). Hooked on the first block: the critic's trunk is called without its
    head's forward."""
    def hook(block, args, kwargs):  # a block sees hidden states (B, L, H)
        hidden = args[0] if args else kwargs["hidden_states"]
        if block.training and hidden.shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (staged by the test)")
    transformer_blocks(getattr(models, role))[0].register_forward_pre_hook(hook,
                                                                            with_kwargs=True)


def test_auto_micro_batch_redoes_a_mini_batch_that_runs_out_of_memory(rm_dir, prompts, caplog):
    """Mini-batches of 4 where only 2 episodes fit: the first mini-batch is redone as 2
    micro-batches and the run goes on so, ending with the weights of a run configured with
    gradient_accumulation_steps 2 from the start; without the option the error stands."""
    cfg = PPOConfig(**SMALL, auto_micro_batch=True)
    _, _, planned = run(cfg.model_copy(update={"gradient_accumulation_steps": 2,
                                               "auto_micro_batch": False}), rm_dir, prompts)
    models, logs = models_for(cfg, rm_dir), []
    fail_training_forwards_over(models, rows=2)
    summary = train_ppo(cfg, models, prompts=prompts, seed=0, log_fn=lambda m, s: logs.append(m))
    assert summary["steps"] == 2
    assert [m["ppo/perf/accumulation"] for m in logs] == [2.0, 2.0]
    assert "redoing it as 2 of 2" in caplog.text
    for a, b in zip(planned.policy.parameters(), models.policy.parameters()):
        assert torch.equal(a, b)

    plain = models_for(cfg.model_copy(update={"auto_micro_batch": False}), rm_dir)
    fail_training_forwards_over(plain, rows=2)
    with pytest.raises(torch.OutOfMemoryError, match="staged"):
        train_ppo(cfg.model_copy(update={"auto_micro_batch": False}), plain, prompts=prompts,
                  seed=0)

    hopeless = models_for(cfg, rm_dir)
    fail_training_forwards_over(hopeless, rows=0)
    with pytest.raises(torch.OutOfMemoryError, match="micro-batches of one episode"):
        train_ppo(cfg, hopeless, prompts=prompts, seed=0)


def test_auto_micro_batch_is_refused_across_processes(rm_dir, prompts):
    from tasks.distributed import DataParallel

    cfg = PPOConfig(**SMALL, auto_micro_batch=True)
    dp = DataParallel(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="auto_micro_batch works in one process, not 2"):
        train_ppo(cfg, models_for(cfg, rm_dir), prompts=prompts, seed=0, dp=dp)


def test_kl_budget_stops_early_with_reason(rm_dir, prompts, tmp_path):
    cfg = PPOConfig(**dict(SMALL, total_episodes=32), kl_budget=-1.0)
    summary, logs, _ = run(cfg, rm_dir, prompts, checkpoint=tmp_path / "ckpt.pt")
    assert summary["steps"] == 1 and summary["planned_steps"] == 4
    assert "exceeded kl_budget" in summary["stop_reason"]
    # A re-run does not train past the recorded stop.
    again, _, _ = run(cfg, rm_dir, prompts, checkpoint=tmp_path / "ckpt.pt")
    assert again["steps"] == 1 and again["stop_reason"] == summary["stop_reason"]


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_mixed_precision_is_fp32_on_cpu(mixed_precision):
    """On CPU the trained models run in fp32 whatever the setting: no autocast, no loss
    scaling (the frozen models' bf16 weights: tests/test_ppo_precision.py)."""
    cfg, cpu = PPOConfig(mixed_precision=mixed_precision), torch.device("cpu")
    assert isinstance(autocast(cfg, cpu), contextlib.nullcontext)
    assert grad_scaler(cfg, cpu) is None
    with autocast(cfg, cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("mixed_precision, dtype, scaled", [
    ("no", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)])
def test_mixed_precision_on_cuda_picks_its_dtype(mixed_precision, dtype, scaled):
    """The CUDA choice, checked without a GPU: torch.autocast("cuda") and GradScaler("cuda")
    can be built anywhere (without CUDA they warn and disable themselves)."""
    cfg, cuda = PPOConfig(mixed_precision=mixed_precision), torch.device("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ctx, scaler = autocast(cfg, cuda), grad_scaler(cfg, cuda)
    if dtype is None:
        assert isinstance(ctx, contextlib.nullcontext)
    else:
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    assert isinstance(scaler, torch.amp.GradScaler) == scaled  # fp16 only: bf16 has fp32's range


def test_value_head_on_the_policy_shares_its_trunk(rm_dir, prompts):
    cfg = PPOConfig(**SMALL, critic_init="policy")
    models = models_for(cfg, rm_dir)
    critic = models.critic
    assert critic.trunk is models.policy.transformer and models.reward_model is not None
    assert not critic.score.weight.any()  # V starts at 0
    n_policy = sum(1 for p in models.policy.parameters() if p.requires_grad)
    assert len(models.trainable_params()) == n_policy + 1  # the trunk counted once
    summary = train_ppo(cfg, models, prompts=prompts, seed=0)
    assert summary["steps"] == 2 and critic.score.weight.any()


def test_generation_logprobs_match_a_full_forward(tok, prompts):
    """Rollout log-probs come from generate's own logits; they must equal a fresh forward."""
    from models.loading import load_causal_lm
    from models.rollout import generate, pad_sequences, response_logprobs

    policy = load_causal_lm(BASE).eval()
    q, qm = pad_sequences(prompts[:8], tok.pad_token_id, left=True)
    torch.manual_seed(0)
    resp, mask, _, logp = generate(policy, q, qm, max_new_tokens=10, temperature=0.7,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   with_logprobs=True)
    ids, attn = torch.cat([q, resp], 1), torch.cat([qm, mask.long()], 1)
    with torch.no_grad():
        full = response_logprobs(policy, ids, attn, resp, temperature=0.7) * mask
    assert torch.allclose(logp, full, atol=1e-4)


def test_left_padded_episodes_give_the_same_logprobs_and_values(tok, prompts):
    """The trainer's forwards read episodes back to back (``left_pad_episodes``, fewer
    columns); log-probs, entropy and values at real response tokens must be those of the
    [prompt | response] layout, up to float summation order."""
    from models.loading import load_causal_lm
    from models.rollout import (SharedTrunkCritic, generate, left_pad_episodes, pad_sequences,
                                response_logprobs, response_values)

    policy = load_causal_lm(BASE).eval()
    critic = SharedTrunkCritic(policy).eval()
    torch.nn.init.normal_(critic.score.weight)  # non-zero values to compare
    q, qm = pad_sequences(prompts[:16], tok.pad_token_id, left=True)
    torch.manual_seed(0)
    resp, mask, _ = generate(policy, q, qm, max_new_tokens=16, temperature=1.0,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert 0 < mask.sum() < mask.numel()  # responses of several lengths
    ids, attn = torch.cat([q, resp], 1), torch.cat([qm, mask.long()], 1)
    eids, eattn = left_pad_episodes(q, qm, resp, mask)
    assert eids.shape[1] < ids.shape[1]
    T = resp.shape[1]
    with torch.no_grad():
        lp, ent = response_logprobs(policy, ids, attn, resp, 0.7, with_entropy=True)
        elp, eent = response_logprobs(policy, eids, eattn, resp, 0.7, with_entropy=True,
                                      response_mask=mask)
        v = response_values(critic, ids, attn, T)
        ev = response_values(critic, eids, eattn, T, response_mask=mask)
    for a, b in ((lp, elp), (ent, eent), (v, ev)):
        assert a.shape == b.shape == mask.shape
        assert torch.allclose(a * mask, b * mask, atol=1e-5)


def test_decode_drops_finished_rows_without_changing_samples(tok, prompts):
    """Finished rows leave the batch: the same seed samples the same tokens as keeping every
    row (one uniform per batch row and step), log-probs equal to float noise, pad after EOS,
    and the loop stops once every row has its EOS."""
    from models.loading import load_causal_lm
    from models.rollout import decode, pad_sequences, response_mask_from_ids

    policy = load_causal_lm(BASE).eval()
    q, qm = pad_sequences(prompts[:16], tok.pad_token_id, left=True)
    out = {}
    for drop in (True, False):
        torch.manual_seed(1)
        out[drop] = decode(policy, q, qm, max_new_tokens=24, temperature=0.9,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           drop_finished=drop)
    (ids, logp), (ids_all, logp_all) = out[True], out[False]
    assert torch.equal(ids, ids_all)
    torch.testing.assert_close(logp, logp_all, atol=1e-5, rtol=0)
    mask, ended = response_mask_from_ids(ids, tok.eos_token_id)
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # rows did finish at different steps
    if ended.all():
        assert lengths.max() == ids.shape[1] < 24  # no column after the last EOS
    assert (ids[mask == 0] == tok.pad_token_id).all() and (logp[mask == 0] == 0).all()
    assert (logp[mask == 1] < 0).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_decode_samples_what_decode_does(tok, prompts, attention):
    """``decode_static`` (``decode_cache: graphs``; eager on CPU, the step a GPU captures)
    with its prompts padded further in front and its own 4-D masks over a static cache: the
    same seed samples ``decode``'s tokens, log-probs equal to float noise and equal to a
    fresh forward's, the same width; checking for the end only every 8 steps (as with a
    graph) changes nothing but the steps run."""
    from models.loading import load_causal_lm
    from models.rollout import (decode, decode_static, left_pad_episodes, pad_sequences,
                                response_logprobs, response_mask_from_ids)

    policy = load_causal_lm(BASE).eval()
    policy.config._attn_implementation = attention
    q, qm = pad_sequences(prompts[:16], tok.pad_token_id, left=True)
    kw = dict(max_new_tokens=24, temperature=0.9, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    torch.manual_seed(1)
    ids, logp = decode(policy, q, qm, **kw)
    for check_every in (1, 8):
        torch.manual_seed(1)
        s_ids, s_logp = decode_static(policy, q, qm, **kw, prompt_width=q.shape[1] + 5,
                                      check_every=check_every)
        assert torch.equal(s_ids, ids)
        torch.testing.assert_close(s_logp, logp, atol=1e-5, rtol=0)
    mask, _ = response_mask_from_ids(ids, tok.eos_token_id)
    assert mask.sum(1).min() < mask.sum(1).max()  # rows ended at different steps
    e_ids, e_mask = left_pad_episodes(q, qm, ids, mask)
    with torch.no_grad():
        fresh = response_logprobs(policy, e_ids, e_mask, ids, 0.9, response_mask=mask)
    torch.testing.assert_close(s_logp, fresh * mask, atol=1e-4, rtol=0)


def test_trainer_imports_without_prefect_or_mlflow():
    """A GPU box may have torch, transformers and pydantic only: the trainer and the stage
    module must import without Prefect or MLflow (mlflow is imported inside run_ppo)."""
    code = ("import sys, tasks.ppo_trainer, tasks.ppo; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
