"""Benchmark worker: our PPO (``tasks/ppo_trainer.py``) on the driver's matched settings.

    .venv/bin/python bench/ppo_worker_ours.py SETTINGS.json RESULT.json

Started by ``bench/bench_ppo.py`` in its own process; times ``train_ppo`` only (model
loading excluded) and writes one result (see ``ppo_bench_common.result``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import ppo_bench_common as common  # noqa: E402


# PPOConfig fields a settings file may set beyond the matched ones (bench_gpu's variants)
VARIANT_KEYS = ("cudnn_attention", "compile_update", "auto_micro_batch", "width_multiple")


def ppo_config(s: dict):
    """Our ``PPOConfig`` for the driver's matched settings ``s`` (also bench/profile_ppo.py's)."""
    import tasks.ppo as ppo

    return ppo.PPOConfig(
        total_episodes=s["total_episodes"], batch_size=s["batch_size"],
        mini_batch_size=s["batch_size"] // s["mini_batches"], gradient_accumulation_steps=1,
        ppo_epochs=s["ppo_epochs"], learning_rate=s["learning_rate"], lr_schedule="linear",
        max_prompt_length=s["max_prompt_length"], max_new_tokens=s["response_length"],
        temperature=s["temperature"], init_kl_coef=s["kl_coef"], adaptive_kl=False,
        kl_estimator="k1", kl_in_reward=True, gamma=s["gamma"], lam=s["lam"],
        clip_range=s["cliprange"], clip_range_value=s["cliprange_value"], vf_coef=s["vf_coef"],
        ent_coef=0.0, whiten_advantages=True, whiten_rewards=False,
        mixed_precision=s.get("mixed_precision", "no"), decode_cache=s.get("decode_cache", "dynamic"),
        missing_eos_penalty=s["missing_eos_penalty"], critic_init="reward",
        checkpoint_every=10**9, log_every=1,
        # what bench/device/bench_gpu.VARIANTS may set; else the trainer's defaults
        **{k: s[k] for k in VARIANT_KEYS if k in s})


def main(settings_path: str, result_path: str) -> None:
    s = common.read_settings(settings_path)
    torch, device = common.setup_torch(s)
    import transformers
    try:  # only for the versions record: the GPU image runs ours without trl
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None

    import tasks.ppo as ppo
    import tasks.ppo_trainer as trainer

    cfg = ppo_config(s)
    models = ppo.build_models(cfg, s["policy_dir"], s["rm_dir"], device)
    tok = models.tokenizer
    prompts = ppo._load_prompts(s["prompts_path"], tok, cfg.max_prompt_length)
    rss_after_load = common.rss_mb()

    clock = common.Clock()
    on_update, perf = common.instrument_ours(trainer, clock, tok.eos_token_id)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    clock.start()
    summary = trainer.train_ppo(cfg, models, prompts=prompts, seed=s["seed"], checkpoint=None,
                                log_fn=on_update)
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock.stop()
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    final = summary["final"]
    common.write_result(result_path, common.result(
        s, clock, side="ours", rss_after_load_mb=rss_after_load, cuda_peak_mb=cuda_peak,
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "trl": trl_version, "cudnn": torch.backends.cudnn.version()},
        extra={"final": {k: final.get(k) for k in ("objective/kl", "objective/scores",
                                                  "episode/eos_rate", "episode/length")},
               "perf_updates": perf, "mixed_precision": cfg.mixed_precision,
               # what a variant set (bench/device/bench_gpu.VARIANTS), or the defaults
               **{k: getattr(cfg, k) for k in VARIANT_KEYS},
               "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               "decode_cache": trainer.decode_cache(cfg, models.policy, device)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
