"""bench/device/: the FLOP counts against hand values, and the one-command GPU benchmark run
on CPU at tiny size (ours only: the trl 1.12 side needs its own venv or the carried wheels,
and is exercised by bench/bench_ppo.py; the GPU numbers need a lent GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench/device"))

import mfu  # noqa: E402


def test_phase_flops_by_hand():
    m = mfu.ModelCounts(policy_trunk=10, lm_head=3, critic_trunk=5, reward_trunk=7)
    u = mfu.UpdateShape(batch=2, prompt=4, response=3, epochs=2)  # 14 tokens of context
    f = mfu.phase_flops(m, u)
    assert f["generation"] == 2 * 10 * 14 + 2 * 3 * 2 * 3            # 316
    assert f["scoring"] == 2 * 10 * 14 + 2 * 3 * 2 * 4 + 2 * 5 * 14 + 2 * 7 * 14  # 664
    assert f["update"] == 2 * (6 * 10 * 14 + 6 * 3 * 2 * 4 + 6 * 5 * 14)        # 2808
    assert mfu.phase_flops(m, u, lora=True)["update"] == 2 * (4 * 140 + 4 * 24 + 4 * 70)
    assert mfu.decode_bound_tokens_per_s(m, batch=2, bandwidth=104.0) == 4.0  # 52 B per step
    u2 = mfu.utilisation({"update": 10.0}, {"update": 2.0}, peak=10.0)
    assert u2["update"] == {"tflops": 5e-12, "mfu": 0.5}
    assert mfu.device_key("NVIDIA H100 80GB HBM3") == "H100" and mfu.device_key("cpu") is None


def test_matmul_params_of_gpt2():
    """GPT-2 blocks hold 12 H^2 matmul weights (qkv 3, proj 1, mlp 4 + 4); the head is V x H,
    tied to the embedding but counted: it is a matmul."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / "demo/base_model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    H, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    assert mfu.matmul_params(model) == (12 * L * H * H, V * H)


def test_matmul_params_count_lora_base_weights_once():
    """peft's LoRA layer wraps a Linear and shows its weight as its own: counted once, the
    base's count plus only the adapters' A and B matrices (a first 7 B run counted 2x)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / "demo/base_model")
    model = AutoModelForCausalLM.from_config(cfg)
    trunk, head = mfu.matmul_params(model)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    H, L = cfg.n_embd, cfg.n_layer
    # c_attn is H -> 3H: A is r x H, B is 3H x r, once per block.
    assert mfu.matmul_params(lora) == (trunk + L * (4 * H + 3 * H * 4), head)
    assert torch.is_tensor(lora.base_model.model.transformer.h[0].attn.c_attn.weight)


@pytest.mark.timeout(120)
def test_device_script_runs_on_cpu_at_tiny_size(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "SKIP_WHEELS": "1"}
    proc = subprocess.run(
        ["bash", "bench/device/run.sh", "--device", "cpu", "--sizes", "tiny", "--sides", "ours",
         "--precisions", "bf16", "--no-static-decode", "--lora", "tiny", "--response-length", "8", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    report = json.loads((out / "bench_gpu.json").read_text())
    assert not report["failed"] and not report["skipped"]
    tags = [r["tag"] for r in report["runs"]]
    # the static-cache decode run is left out here (tests/test_ppo_precision.py covers it)
    assert tags == ["tiny_ours_bf16_dynamic", "tiny_ours-lora_bf16_dynamic"]
    for r in report["runs"]:
        assert r["episodes"] == r["updates"] * r["batch_size"] and r["episodes_per_s"] > 0
        phases = r["analysis"]["phases"]
        assert set(phases) == {"generation", "scoring", "update"}
        assert all(p["tflops"] > 0 and p["mfu"] is None for p in phases.values())  # CPU: no peak
    lora = report["runs"][-1]
    assert 0 < lora["trained_params"] < lora["base_params_per_copy"]
    md = (out / "bench_gpu.md").read_text()
    assert md.count("| tiny | ours") == 2
    assert (out / "runs.tar.gz").stat().st_size > 0
