"""FLOPs per PPO phase, model-FLOPs utilisation (MFU) and the decode bandwidth bound.

Pure arithmetic on shapes and parameter counts (standard library only), so the device
script, the CPU test and a reader with a pencil get the same numbers.

Counting convention (Kaplan et al. 2020, "Scaling laws", section 2.1; PaLM's MFU, Chowdhery
et al. 2022, appendix B): a forward pass costs 2 FLOPs per matmul parameter per token, a
training step 6 (forward 2, backward 4: input and weight gradients). With LoRA the frozen
base needs no weight gradients: 4 per base parameter. Attention scores (about 4 * L * ctx * d
per token against 2N = 24 * L * d**2) are left out: ctx / (6 d), 3.5 % at ctx 160 and d 768,
1.3 % at d 2048. Only what runs is counted: the vocabulary projection at the positions whose
logits are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dense (no sparsity) tensor-core peaks from NVIDIA's H100/H200 SXM datasheets, FLOP/s.
# The H200 is the H100's chip with more, faster memory: same compute peaks.
PEAK_FLOPS = {
    "H100": {"bf16": 989.4e12, "tf32": 494.7e12},
    "H200": {"bf16": 989.4e12, "tf32": 494.7e12},
}
# HBM bandwidth, bytes/s (datasheets: H100 SXM 3.35 TB/s HBM3, H200 4.8 TB/s HBM3e).
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def device_key(device_name: str) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; None for a device without a table entry."""
    return next((k for k in PEAK_FLOPS if k in device_name), None)


@dataclass
class ModelCounts:
    """Matmul parameters of the models of a run (embedding lookups are no FLOPs)."""

    policy_trunk: int   # transformer blocks of the policy (= reference)
    lm_head: int        # vocab x hidden: the vocabulary projection
    critic_trunk: int   # value model's blocks (0 when the critic shares the policy's trunk)
    reward_trunk: int   # reward model's blocks
    head_bytes: int = 4  # bytes per weight read while decoding (2 under bf16, 4 in fp32)


@dataclass
class UpdateShape:
    """One PPO update's shapes, as logged in ``ppo/perf/*``."""

    batch: int       # episodes B
    prompt: int      # prompt width P (left-padded)
    response: int    # response width T (generation stops when every row has ended)
    epochs: int      # PPO epochs over the batch


def phase_flops(m: ModelCounts, u: UpdateShape, lora: bool = False) -> dict[str, float]:
    """FLOPs of the three phases of one update.

    generation: prefill of B*P tokens plus T decode steps of B rows (finished rows still
    compute), vocabulary projection at the T sampled positions only.
    scoring: reference forward (logits at T+1 positions), critic and reward-model forwards
    over all P+T columns.
    update: ``epochs`` passes of forward+backward of policy (logits at T+1 positions) and
    critic. Minibatches are cut to their own longest response, so T is an upper bound there.
    """
    B, P, T = u.batch, u.prompt, u.response
    ctx = B * (P + T)
    train = 4 if lora else 6
    generation = 2 * m.policy_trunk * ctx + 2 * m.lm_head * B * T
    scoring = (2 * m.policy_trunk * ctx + 2 * m.lm_head * B * (T + 1)
               + 2 * m.critic_trunk * ctx + 2 * m.reward_trunk * ctx)
    update = u.epochs * (train * m.policy_trunk * ctx + train * m.lm_head * B * (T + 1)
                         + train * m.critic_trunk * ctx)
    return {"generation": float(generation), "scoring": float(scoring), "update": float(update)}


def decode_bound_tokens_per_s(m: ModelCounts, batch: int, bandwidth: float) -> float:
    """Upper bound on sampled tokens/s: each decode step reads every policy weight once from
    memory (KV cache and activations ignored), and yields one token per row."""
    weight_bytes = (m.policy_trunk + m.lm_head) * m.head_bytes
    return batch * bandwidth / weight_bytes


def utilisation(flops: dict[str, float], seconds: dict[str, float], peak: float | None
                ) -> dict[str, dict[str, float | None]]:
    """Per phase: achieved TFLOP/s and MFU (None without a known peak)."""
    out = {}
    for phase, f in flops.items():
        s = seconds[phase]
        rate = f / s if s > 0 else 0.0
        out[phase] = {"tflops": rate / 1e12, "mfu": rate / peak if peak else None}
    return out


def matmul_params(model) -> tuple[int, int]:
    """(trunk, head): weights of the Linear / GPT-2 Conv1D layers of ``model`` apart from its
    vocabulary projection, and that projection's (vocab x hidden; a tied one counts too: it
    is a matmul, whatever it shares with the embedding lookup). Works on a meta-device model."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(out_emb, "weight", None)
    trunk, seen = 0, {id(head_w)}
    for module in model.modules():
        w = getattr(module, "weight", None)
        # Each weight once: peft's LoRA layer (also a class named Linear) wraps its base
        # Linear and exposes the base's weight as its own, so both modules name one tensor.
        if type(module).__name__ in ("Linear", "Conv1D") and w is not None and id(w) not in seen:
            seen.add(id(w))
            trunk += w.numel()
    return trunk, (head_w.numel() if head_w is not None else 0)
