"""bf16 frozen models and the static-cache decode path, on the demo's tiny GPT-2 on CPU.

What a GPU adds (autocast over fp32 master weights, torch.compile of the static decode step)
is not exercised here; bench/device/ measures it on a lent GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.loading import load_causal_lm, load_tokenizer
from tasks.ppo import PPOConfig, _load_prompts, build_models, frozen_dtype, trained_base_dtype
from tasks.ppo_trainer import make_rollout, train_ppo
from tasks.base import LoraSettings

BASE = "demo/base_model"
SMALL = dict(total_episodes=32, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8,
             learning_rate=3e-4)


@pytest.fixture(scope="module")
def prompts():
    return _load_prompts("demo/data/rl_prompts.jsonl", load_tokenizer(BASE), 32)[:32]


def dtypes(module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def test_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert frozen_dtype(PPOConfig(mixed_precision="bf16")) == torch.bfloat16
    # fp16 weights would overflow without a scaler: only autocast uses fp16
    assert frozen_dtype(PPOConfig(mixed_precision="fp16")) == torch.float32
    assert frozen_dtype(PPOConfig(mixed_precision="no")) == torch.float32
    lora = LoraSettings()
    assert trained_base_dtype(PPOConfig(mixed_precision="bf16"), cuda) == torch.float32
    assert trained_base_dtype(PPOConfig(mixed_precision="bf16", lora=lora), cuda) == torch.bfloat16
    assert trained_base_dtype(PPOConfig(mixed_precision="bf16", lora=lora), cpu) == torch.float32


def test_bf16_holds_frozen_models_in_bf16_and_trains_close_to_fp32(tiny_reward_dir, prompts):
    """Same seed, same data: fp32 everywhere vs bf16 reference and reward model.

    On CPU the policy is fp32 in both runs (no autocast there), so the first batch's samples
    are identical and only the frozen models' outputs differ. bf16 keeps 8 significant bits
    (relative rounding <= 2**-9 per weight); measured on this model the per-sequence KL moved
    by <= 0.018 nats (8 tokens) and the score by <= 0.001 over 4 updates. Bounds 0.05 nats
    and 0.01 leave ~3x and ~10x margin while catching a wrong dtype path (a bf16 log_softmax
    or a policy cast to bf16 moves KL by tenths of a nat here).
    """
    runs = {}
    for mp in ("no", "bf16"):
        cfg = PPOConfig(**SMALL, mixed_precision=mp)
        models = build_models(cfg, BASE, tiny_reward_dir, torch.device("cpu"))
        frozen = torch.bfloat16 if mp == "bf16" else torch.float32
        assert dtypes(models.reference) == dtypes(models.reward_model) == {frozen}
        assert dtypes(models.policy) == dtypes(models.critic) == {torch.float32}  # fp32 masters
        runs[mp] = train_ppo(cfg, models, prompts=prompts, seed=0)["history"]
    fp32, bf16 = runs["no"], runs["bf16"]
    assert len(fp32) == len(bf16) == 4
    assert abs(fp32[0]["kl"]) < 1e-5  # policy == reference at step 0, in fp32
    assert bf16[0]["kl"] != fp32[0]["kl"]  # the bf16 reference really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a["kl"] - b["kl"]) < 0.05, (a, b)
        assert abs(a["score"] - b["score"]) < 0.01, (a, b)


def test_static_cache_decode_samples_what_generate_does(tiny_reward_dir, prompts):
    """``decode_cache: static`` samples through ``model.generate`` (whose static decode step a
    GPU compiles): same seed, the tokens of ``model.generate`` with its default cache, the
    same stop (every row's EOS), and log-probs equal to a fresh forward's up to float noise.
    The default dynamic path (``models.rollout.decode``) draws its own samples: tested in
    tests/test_ppo_options.py."""
    from models.rollout import (left_pad_episodes, pad_sequences, response_logprobs,
                                response_mask_from_ids)

    cfg = PPOConfig(**dict(SMALL, max_new_tokens=24), mixed_precision="no",
                    decode_cache="static")
    models = build_models(cfg, BASE, tiny_reward_dir, torch.device("cpu"))
    tok = models.tokenizer
    torch.manual_seed(3)
    s = make_rollout(cfg, models, prompts[:8], beta=0.05)
    q, qm = pad_sequences(prompts[:8], tok.pad_token_id, left=True)
    torch.manual_seed(3)
    out = models.policy.generate(input_ids=q, attention_mask=qm, do_sample=True, top_k=0,
                                 top_p=1.0, temperature=cfg.temperature, max_new_tokens=24,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    response = out[:, q.shape[1]:]
    mask, _ = response_mask_from_ids(response, tok.eos_token_id)
    assert torch.equal(s.response_ids, response.masked_fill(mask == 0, tok.pad_token_id))
    assert torch.equal(s.response_mask, mask)
    assert s.response_ids.shape[1] <= 24
    ids, attn = left_pad_episodes(q, qm, s.response_ids, s.response_mask)
    with torch.no_grad():
        full = response_logprobs(models.policy, ids, attn, s.response_ids, cfg.temperature,
                                 response_mask=s.response_mask) * s.response_mask
    torch.testing.assert_close(s.logprobs, full, atol=1e-4, rtol=0)


def test_auto_decode_cache_picks_graphs_then_static_on_a_gpu_only():
    """``auto`` on a CUDA device without LoRA: graphs for a model our loop can drive, static
    for one only transformers can compile (here: a sliding window our masks lack), dynamic
    for neither; dynamic on CPU and with LoRA. Explicit values stand."""
    from tasks.ppo_trainer import decode_cache

    gpt2 = load_causal_lm(BASE)
    windowed = load_causal_lm(BASE)
    windowed.config.sliding_window = 8
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device name: no GPU needed
    auto = PPOConfig()
    assert auto.decode_cache == "auto"
    assert decode_cache(auto, gpt2, cuda) == "graphs"
    assert decode_cache(auto, windowed, cuda) == "static"
    assert decode_cache(auto, gpt2, cpu) == "dynamic"
    assert decode_cache(auto.model_copy(update={"lora": LoraSettings()}), gpt2, cuda) == "dynamic"
    assert decode_cache(auto, torch.nn.Linear(2, 2), cuda) == "dynamic"  # not compilable
    for explicit in ("static", "dynamic", "graphs"):
        cfg = auto.model_copy(update={"decode_cache": explicit})
        assert decode_cache(cfg, gpt2, cpu) == decode_cache(cfg, gpt2, cuda) == explicit


@pytest.mark.parametrize("scale", [1e-3, 1e3])  # below and above max_norm
def test_clip_grad_norm_matches_torch_bit_for_bit(scale):
    from tasks.ppo_trainer import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, ref):
        a.grad = torch.randn(5, 3) * scale
        b.grad = a.grad.clone()
    n_ours = clip_grad_norm(ours, 1.0)
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(n_ours, n_ref)
    for a, b in zip(ours, ref):
        assert torch.equal(a.grad, b.grad)
    assert (float(n_ours) > 1.0) == (scale > 1)


def test_trainer_module_needs_no_pydantic():
    """tasks/ppo_trainer.py alone imports torch and models/ only (the GPU image has no
    pydantic; bench/device/ carries it for tasks/ppo.py's config)."""
    import subprocess
    import sys

    code = ("import sys, tasks.ppo_trainer; print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'pydantic', 'prefect', 'mlflow', 'trl', 'datasets'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_lora_critic_values_on_a_qwen2_trunk():
    """Through peft, Llama/Qwen's trunk (prefix ``model``) was looked up as LoraModel.model,
    the whole model with its head: values came back as a SequenceClassifierOutput."""
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from models.reward import score_sequences
    from models.rollout import scalar_head_per_token
    from tasks.base import peft_config

    torch.manual_seed(0)
    conf = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    critic = get_peft_model(Qwen2ForSequenceClassification(conf),
                            peft_config(LoraSettings(r=4), "SEQ_CLS", ["score"]))
    ids, mask = torch.randint(1, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    values = scalar_head_per_token(critic, ids, mask)
    assert values.shape == (3, 7)
    assert score_sequences(critic, ids, mask).shape == (3,)
    torch.testing.assert_close(values[:, -1], score_sequences(critic, ids, mask))
