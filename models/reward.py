"""Reward model math: Bradley-Terry loss, scoring, calibration and score normalisation.

Pure tensor functions (torch and transformers only). Shapes: B = batch, T = sequence length.

- Bradley-Terry preference model: P(a > b) = sigmoid(r_a - r_b) (Bradley & Terry 1952; as a
  reward-model loss in Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, Eq. 1).
- Margin variant: Llama 2, https://arxiv.org/abs/2307.09288, Sec. 3.2.2, Eq. 2.
- Temperature scaling and ECE: Guo et al. 2017, https://arxiv.org/abs/1706.04599.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CALIBRATION_FILE = "reward_calibration.json"


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                  margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood: mean of -log sigmoid(r_c - r_r - margin).

    r_chosen, r_rejected, margin: (B,) -> scalar. Same formula as TRL's RewardTrainer.
    """
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen answer scores strictly higher; (B,), (B,) -> float."""
    return (r_chosen > r_rejected).float().mean().item()


def preference_nll(diffs: torch.Tensor, soft_labels: torch.Tensor,
                   temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of sigmoid(diff / T) against soft labels p in [0, 1]; (B,) each.

    -[p log sigmoid(d/T) + (1 - p) log sigmoid(-d/T)], written with logsigmoid for stability.
    """
    z = diffs / temperature
    return -(soft_labels * F.logsigmoid(z) + (1 - soft_labels) * F.logsigmoid(-z)).mean().item()


def fit_temperature(diffs: torch.Tensor, soft_labels: torch.Tensor,
                    bounds: tuple[float, float] = (1e-2, 1e2), iters: int = 100) -> float:
    """Temperature T > 0 minimising preference_nll(diffs, soft_labels, T) (Guo et al. 2017, Sec. 4.2).

    diffs: (B,) r_chosen - r_rejected; soft_labels: (B,) e.g. chosen_votes / num_votes.
    The NLL is convex in beta = 1 / T (logistic loss of beta * d), so a golden-section search
    over beta in [1 / bounds[1], 1 / bounds[0]] finds the optimum without gradients (L-BFGS
    stalls on the vanishing gradient when T -> 0). With hard labels and perfectly separated
    pairs the optimum is T -> 0, so the lower bound is what comes back.
    """
    d = diffs.detach().double()
    p = soft_labels.detach().double()

    def nll(beta: float) -> float:
        z = beta * d
        return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean().item()

    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    g = (math.sqrt(5) - 1) / 2  # 0.618...
    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return 1.0 / ((lo + hi) / 2)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """Reliability ECE: sum over equal-width bins of (n_b / N) * |mean(prob_b) - mean(label_b)|.

    probs: (B,) predicted P(chosen preferred); labels: (B,) observed frequency (soft or 0/1).
    Bins are [0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1] (the last one closed), as in Guo et al. 2017
    Eq. 3 with the binary outcome's probability in place of the top-class confidence.
    """
    probs = probs.detach().double()
    labels = labels.detach().double()
    bins = (probs * n_bins).long().clamp(max=n_bins - 1)  # (B,) bin index
    ece = torch.zeros((), dtype=torch.float64)
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            gap = (probs[in_bin].mean() - labels[in_bin].mean()).abs()
            ece += in_bin.double().mean() * gap
    return float(ece)


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar head at the last attended token of each row: (B, T), (B, T) -> (B,).

    Works for left-, right- and un-padded batches: the position is found from the mask, never
    from ``pad_token_id`` (many tokenizers have pad == eos, and then the HF sequence-classification
    forward pools before the final EOS). Position ids follow the mask so left padding does not
    shift positions. After TRL's old ``get_reward``
    (https://github.com/huggingface/trl/blob/v0.11.0/trl/trainer/utils.py#L1069).
    ``model`` is an ``AutoModelForSequenceClassification`` with a ``score`` head (GPT-2, Llama,
    Qwen, Mistral, ... all name it so).
    """
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
    logits = model.score(hidden).squeeze(-1)  # (B, T)
    return _at_last_attended(logits, attention_mask)


def _at_last_attended(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token scores -> (B,) the score at each row's rightmost attended token."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)  # (T,)
    last = (positions * attention_mask).argmax(-1)  # (B,) rightmost index with mask == 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last]  # (B,)


def score_sequences_through(wrapper, model, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> torch.Tensor:
    """``score_sequences`` for a ``model`` inside a distributed ``wrapper`` (DDP, DeepSpeed,
    FSDP): (B, T), (B, T) -> (B,).

    The wrapper's own forward must run, or it never learns which gradients to reduce (DDP
    prepares its reducer in forward: https://pytorch.org/docs/stable/notes/ddp.html#internal-design;
    FSDP gathers the weights there). So the forward runs through ``wrapper`` with the same
    inputs as ``score_sequences``, and a hook on ``model.score`` keeps the per-token scores
    (B, T, 1) that the HF head computes before pooling at the last non-pad token; we pool
    at the last attended token instead, as ``score_sequences`` does.
    """
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    kept: list[torch.Tensor] = []
    handle = model.score.register_forward_hook(lambda module, args, out: kept.append(out))
    try:
        wrapper(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False)
    finally:
        handle.remove()
    return _at_last_attended(kept[-1].squeeze(-1), attention_mask)


@dataclass
class RewardNorm:
    """How to read raw reward-model scores.

    ``normalize`` standardises raw scores with the mean/std measured on the SFT policy's own
    samples, so the RL stage starts from rewards ~ N(0, 1) whatever the RM's scale.
    ``temperature`` calibrates preference probabilities: P(a > b) = sigmoid((r_a - r_b) / T).
    (Dividing by T before standardising would cancel out, so normalize does not use it.)
    """

    temperature: float = 1.0
    mean: float = 0.0
    std: float = 1.0

    def normalize(self, raw_scores: torch.Tensor) -> torch.Tensor:
        """(B,) raw scores -> (B,) (raw - mean) / std."""
        return (raw_scores - self.mean) / max(self.std, 1e-8)

    def preference_prob(self, r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
        """Calibrated P(a preferred over b); (B,), (B,) -> (B,)."""
        return torch.sigmoid((r_a - r_b) / self.temperature)

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``reward_calibration.json`` (these fields plus ``extra``, e.g. eval metrics)."""
        path = Path(directory) / CALIBRATION_FILE
        path.write_text(json.dumps({**(extra or {}), **asdict(self)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "RewardNorm":
        data = json.loads((Path(directory) / CALIBRATION_FILE).read_text())
        return cls(temperature=float(data["temperature"]), mean=float(data["mean"]),
                   std=float(data["std"]))
