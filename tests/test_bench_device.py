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
        assert len(r["analysis"]["per_update"]) == r["updates"]
    lora = report["runs"][-1]
    assert 0 < lora["trained_params"] < lora["base_params_per_copy"]
    md = (out / "bench_gpu.md").read_text()
    assert md.count("| tiny | ours") == 2
    assert "| tiny_ours_bf16_dynamic | 2 | " in md  # per update, with its response width
    assert (out / "runs.tar.gz").stat().st_size > 0


def test_kernel_kinds_and_summary_by_hand():
    """The GPU profile's grouping, on kernel names as an H100 profile shows them."""
    sys.path.insert(0, str(ROOT / "bench"))
    import profile_ppo

    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matrix multiplies",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT": "matrix multiplies",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",  # not a GEMM: attention first
        "void at::native::(anonymous namespace)::fused_adamw_kernel": "AdamW (fused) and other multi-tensor ops",
        "void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>>": "AdamW (fused) and other multi-tensor ops",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel": "layer norm",
        "void at::native::GeluCUDAKernelImpl": "GELU",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, NormTwoOps>>": "reductions (norms, sums, max)",
        "Memcpy DtoD (Device -> Device)": "copies, casts, fills",
        "void at::native::vectorized_elementwise_kernel<4, AUnaryFunctor<mul>>": "other elementwise",
        "void at::native::index_elementwise_kernel": "other elementwise",
        "triton_poi_fused_add_0": "other kernels",
    }
    for name, kind in names.items():
        assert profile_ppo.kernel_kind(name) == kind, name
    g = profile_ppo.kernel_summary([("nvjet_a", 600.0), ("nvjet_a", 200.0),
                                    ("Memcpy HtoD", 100.0), ("triton_x", 100.0)], wall_us=2000.0)
    assert g["kernel_ms"] == 1.0 and g["wall_ms"] == 2.0 and g["launches"] == 4
    assert g["idle_share"] == 0.5
    assert g["kinds_ms"] == {"matrix multiplies": 0.8, "copies, casts, fills": 0.1,
                             "other kernels": 0.1}
    assert list(g["top_kernels_ms"]) == ["nvjet_a", "Memcpy HtoD", "triton_x"]


def test_probe_plan():
    import bench_gpu

    args = bench_gpu.argparse.Namespace(probes="warmup,profile", sizes="100m",
                                        warmup_variants="default,no-cudnn-attention",
                                        profile_sizes="1.2b", profile_decode="static",
                                        profile_variants="default,compile-update", jobs=None)
    tags = [(j["kind"], j["size"], j["decode"], j.get("variant")) for j in bench_gpu.plan(args)]
    assert tags == [("pair", "100m", "dynamic", "default"), ("pair", "100m", "dynamic", "no-cudnn-attention"),
                    ("pair", "100m", "static", "cold"), ("pair", "100m", "static", "warm"),
                    ("profile", "1.2b", "static", "default"),
                    ("profile", "1.2b", "static", "compile-update")]
    with pytest.raises(SystemExit, match="unknown variant 'cudnn'"):
        bench_gpu.plan(bench_gpu.argparse.Namespace(**{**vars(args), "warmup_variants": "cudnn"}))
    with pytest.raises(SystemExit, match="unknown variant 'compile'"):
        bench_gpu.plan(bench_gpu.argparse.Namespace(**{**vars(args), "profile_variants": "compile"}))
    comparison = bench_gpu.argparse.Namespace(**{**vars(args), "probes": "", "variant": "compile"},
                                              sides="ours", precisions="bf16",
                                              static_decode=False, lora="none")
    with pytest.raises(SystemExit, match="unknown variant 'compile'"):
        bench_gpu.plan(comparison)
    with pytest.raises(SystemExit, match="unknown probe 'warm'"):
        bench_gpu.plan(bench_gpu.argparse.Namespace(**{**vars(args), "probes": "warm"}))


@pytest.mark.timeout(180)
def test_device_probes_run_on_cpu_at_tiny_size(tmp_path):
    """The warm-up probe's variant reaches the worker (its PPO config's cuDNN attention switch
    and its allocator setting come back in the result), the static decode runs twice, and the
    profile worker times every part of the update, eager and then compiled."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "SKIP_WHEELS": "1"}
    proc = subprocess.run(
        ["bash", "bench/device/run.sh", "--device", "cpu", "--sizes", "tiny", "--probes",
         "warmup,profile", "--warmup-variants", "no-cudnn-attention,expandable-segments",
         "--profile-sizes", "tiny",
         "--response-length", "8", "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out/bench_gpu.json").read_text())
    assert not report["failed"] and not report["skipped"]
    runs = {r["tag"]: r for r in report["runs"]}
    assert list(runs) == ["tiny_ours_bf16_dynamic_no-cudnn-attention",
                          "tiny_ours_bf16_dynamic_expandable-segments",
                          "tiny_ours_bf16_static_cold", "tiny_ours_bf16_static_warm"]
    cudnn = runs["tiny_ours_bf16_dynamic_no-cudnn-attention"]
    assert cudnn["cudnn_attention"] is False and cudnn["cuda_alloc_conf"] is None
    alloc = runs["tiny_ours_bf16_dynamic_expandable-segments"]
    assert alloc["cudnn_attention"] is True
    assert alloc["cuda_alloc_conf"] == "expandable_segments:True"
    assert all(r["updates"] == 3 and r["decode_cache"] == r["job"]["decode"] for r in runs.values())
    eager, compiled = report["profiles"]
    assert [eager["compile_update"], compiled["compile_update"]] == [False, True]
    assert all(eager["median"][f"update/{k}"] > 0 for k in ("response_logprobs",
                                                            "response_values", "backward",
                                                            "optimizer step"))
    # the compiled forwards are not timed apart (the timers would be traced into the graphs)
    assert "update/response_logprobs" not in compiled["median"]
    assert all(compiled["median"][f"update/{k}"] > 0 for k in ("backward", "optimizer step"))
    md = (tmp_path / "out/bench_gpu.md").read_text()
    warmup = md.split("Warm-up probe, per update:\n\n")[1].split("\n\n")[0]
    assert warmup.count("| tiny_ours_bf16_static_warm | ") == 3
    assert md.count("| tiny_ours_bf16_static_warm | ") == 6  # and in the utilisation table
    assert "Profile `tiny_profile_bf16_static_default`" in md
    assert "Profile `tiny_profile_bf16_static_compile-update`" in md


def test_jobs_file_is_checked_before_any_run(tmp_path):
    import bench_gpu

    def plan(entries):
        f = tmp_path / "jobs.json"
        f.write_text(json.dumps(entries))
        return bench_gpu.explicit_plan(str(f))

    jobs = plan([{"size": "1.2b", "side": "ours", "variant": "compile-update+auto-micro-batch",
                  "batch": 256, "episodes": 768}, {"size": "1.2b", "side": "trl112"}])
    assert jobs == [{"kind": "pair", "precision": "bf16", "decode": "graphs", "size": "1.2b",
                     "side": "ours", "variant": "compile-update+auto-micro-batch",
                     "batch": 256, "episodes": 768},
                    {"kind": "pair", "precision": "bf16", "decode": "dynamic", "size": "1.2b",
                     "side": "trl112"}]
    assert bench_gpu.variant_settings("compile-update+auto-micro-batch") == {
        "compile_update": True, "auto_micro_batch": True}
    bad = {"entry 2: needs a size": [{"size": "tiny", "side": "ours"}, {"size": "7b", "side": "ours"}],
           "entry 1: unknown keys \\['lr'\\]": [{"size": "tiny", "side": "ours", "lr": 1}],
           "variants change ours' settings, not trl112's": [
               {"size": "tiny", "side": "trl112", "variant": "compile-update"}],
           "unknown variant 'compile'": [{"size": "tiny", "side": "ours", "variant": "auto-micro-batch+compile"}],
           "decode must be one of dynamic, static, graphs, got 'auto'": [
               {"size": "tiny", "side": "ours", "decode": "auto"}],
           "entry 1: needs a size": {"size": "tiny", "side": "ours"}}  # not a list
    for message, entries in bad.items():
        with pytest.raises(SystemExit, match=message):
            plan(entries)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(SystemExit, match="--jobs .*broken.json"):
        bench_gpu.explicit_plan(str(tmp_path / "broken.json"))


def test_table_compares_ours_with_trl_at_the_same_batch():
    import bench_gpu

    def run(side, batch, whole, steady, variant=None):
        job = {"size": "1.2b", "side": side, "precision": "bf16", "decode": "static",
               **({"variant": variant} if variant else {})}
        return {"job": job, "batch_size": batch, "episodes_per_s": whole,
                "steady_state": {"episodes_per_s": steady}, "first_update_s": 10.0}

    md = bench_gpu.table([run("trl112", 64, 5.0, 6.0), run("ours", 64, 7.5, 15.0),
                          run("ours", 256, 20.0, 48.0, "auto-micro-batch")]).splitlines()
    assert "| x1.50 / x2.50 |" in md[3]
    assert "static (auto-micro-batch) | 256 |" in md[4] and "|  |" in md[4]  # no trl at 256


@pytest.mark.timeout(120)
def test_device_script_runs_a_jobs_file_on_cpu(tmp_path):
    """``--jobs``: a batch and a variant set per run reach the worker."""
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"size": "tiny", "side": "ours", "decode": "graphs",
                                 "variant": "auto-micro-batch+exact-widths", "batch": 8,
                                 "episodes": 16}]))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "SKIP_WHEELS": "1"}
    proc = subprocess.run(
        ["bash", "bench/device/run.sh", "--device", "cpu", "--jobs", str(jobs),
         "--response-length", "8", "--threads", "1", "--job-timeout-s", "100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r,) = json.loads((tmp_path / "out/bench_gpu.json").read_text())["runs"]
    assert r["tag"] == "tiny_ours_bf16_graphs_auto-micro-batch+exact-widths"
    assert r["decode_cache"] == "graphs"  # decode_static, eager on CPU
    assert (r["batch_size"], r["episodes"], r["updates"]) == (8, 16, 2)
    assert r["auto_micro_batch"] is True and r["compile_update"] is False
    assert r["width_multiple"] == 1
    assert r["cudnn_attention"] is True  # the trainer's default, not set by the job


@pytest.mark.timeout(120)
def test_graph_decode_check_runs_on_cpu(tmp_path):
    """bench/device/check_graph_decode.py, the lease's check of the captured decode, at a
    tiny size on CPU (no graph there): both eager ways agree with a fresh forward."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "bench/device/check_graph_decode.py", "--device", "cpu", "--size",
         "tiny", "--new-tokens", "12", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "graph_decode.json").read_text())
    assert report["ok"] and set(report["ways"]) == {"dynamic", "static_eager"}
    for way in report["ways"].values():
        assert 0 < way["width"] <= 12 and way["tokens"] > 0
        assert way["logp_vs_forward_mean_abs"] < 1e-3
