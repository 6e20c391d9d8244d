"""Benchmark worker: our PPO with LoRA on a decoder built from config (random weights).

    python bench/device/lora_worker.py SETTINGS.json RESULT.json

Two base copies only, as ``tasks/ppo.build_models`` arranges with ``lora``: the policy (its
adapters off = the reference) and the critic (its adapters off = the reward model, with
``score`` trained fully as a modules_to_save copy). Built here from a Qwen2 or Llama config
instead of loaded from disk: no hub on the GPU machine, and writing 2 x 15 GB of random
weights to disk only to read them back would spend the lease on I/O. Under
``mixed_precision: bf16`` on a GPU the bases are bf16 (``trained_base_dtype``), adapters fp32.
Times ``train_ppo`` only and writes one result in ``ppo_bench_common``'s format.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench/device"))

import ppo_bench_common as common  # noqa: E402

ARCHS = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
         "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification")}


def ppo_config(s: dict):
    """The benchmark's matched PPO settings (``ppo_worker_ours.ppo_config``), with LoRA."""
    from ppo_worker_ours import ppo_config as matched

    from tasks.base import LoraSettings

    lora = LoraSettings(r=s["lora_r"], alpha=2 * s["lora_r"], dropout=0.0)
    return matched(s).model_copy(update={"lora": lora})


def build(s: dict, cfg, torch, device):
    """Policy and critic from ``s["arch"]`` / ``s["arch_config"]``, ``cfg.lora`` on both."""
    import transformers
    from peft import get_peft_model

    from models.loading import disable_dropout, load_tokenizer, upcast_trainable
    from models.reward import RewardNorm
    from tasks.base import peft_config
    from tasks.ppo import trained_base_dtype
    from tasks.ppo_trainer import PPOModels

    tok = load_tokenizer(str(ROOT / "demo/base_model"))
    conf_cls, lm_cls, seq_cls = (getattr(transformers, n) for n in ARCHS[s["arch"]])
    conf = conf_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    num_labels=1, tie_word_embeddings=False, **s["arch_config"])
    conf._attn_implementation = "sdpa"
    dtype = trained_base_dtype(cfg, device)
    torch.manual_seed(s["seed"])
    with torch.device(device):  # initialise on the GPU: seconds, not minutes, at 7 B
        policy = lm_cls._from_config(conf, dtype=dtype)
        critic = seq_cls._from_config(conf, dtype=dtype)
    policy = get_peft_model(policy, peft_config(cfg.lora, "CAUSAL_LM"))
    critic = get_peft_model(critic, peft_config(cfg.lora, "SEQ_CLS", ["score"]))
    for m in (policy, critic):
        disable_dropout(m)
        upcast_trainable(m)
    policy.generation_config.pad_token_id = tok.pad_token_id
    return PPOModels(policy=policy, reference=None, critic=critic, reward_model=None,
                     reward_norm=RewardNorm(1.0, 0.0, 1.0), tokenizer=tok), conf


def main(settings_path: str, result_path: str) -> None:
    s = common.read_settings(settings_path)
    torch, device = common.setup_torch(s)
    import transformers

    import tasks.ppo as ppo
    import tasks.ppo_trainer as trainer

    cfg = ppo_config(s)
    models, conf = build(s, cfg, torch, device)
    import mfu

    pol_trunk, head = mfu.matmul_params(models.policy)
    critic_trunk, _ = mfu.matmul_params(models.critic)
    counts = {"policy_trunk": pol_trunk, "lm_head": head, "critic_trunk": critic_trunk,
              "reward_trunk": critic_trunk}  # the reward model is the critic, adapters off
    n_base = sum(p.numel() for p in models.policy.parameters() if not p.requires_grad)
    n_trained = sum(p.numel() for p in models.trainable_params())
    prompts = ppo._load_prompts(s["prompts_path"], models.tokenizer, cfg.max_prompt_length)
    rss_after_load = common.rss_mb()
    clock = common.Clock()
    on_update, perf = common.instrument_ours(trainer, clock, models.tokenizer.eos_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights_mb = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    clock.start()
    summary = trainer.train_ppo(cfg, models, prompts=prompts, seed=s["seed"], log_fn=on_update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock.stop()
    cuda = device.type == "cuda"
    common.write_result(result_path, common.result(
        s, clock, side="ours-lora", rss_after_load_mb=rss_after_load,
        cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        extra={"final": {k: summary["final"].get(k) for k in ("objective/kl", "objective/scores")},
               "perf_updates": perf, "mixed_precision": cfg.mixed_precision,
               "decode_cache": trainer.decode_cache(cfg, models.policy, device), "arch": s["arch"],
               "arch_config": json.loads(conf.to_json_string()),
               "counts": counts, "base_params_per_copy": n_base, "trained_params": n_trained,
               "cuda_weights_mb": weights_mb if cuda else None}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
