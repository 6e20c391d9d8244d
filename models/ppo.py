"""PPO math for RLHF as small pure tensor functions.

Shapes: B = batch of sequences, T = response length (tokens after the prompt). Every
per-token tensor is (B, T) with a float ``mask`` (B, T) that is 1 on real response tokens
and 0 on padding after EOS; masked positions never influence a result.

References:
- Schulman et al. 2017, Proximal Policy Optimization (clipped objective, value clipping).
- Schulman et al. 2016, GAE: https://arxiv.org/abs/1506.02438
- Ziegler et al. 2019, Fine-Tuning LMs from Human Preferences (per-token KL penalty,
  adaptive KL controller): https://arxiv.org/abs/1909.08593
- Huang et al. 2024, The N+ implementation details of RLHF with PPO:
  https://arxiv.org/abs/2403.17031
- Schulman 2020, Approximating KL divergence (k1, k2, k3): http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask == 1 (per row when ``dim`` is given)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)  # Bessel's correction, as in TRL's masked_var
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked positions; ``shift_mean=False`` keeps the mean.

    Rewards are whitened without shifting the mean (the sign of a reward carries meaning);
    advantages are shifted too (Huang et al. 2024, detail "advantage whitening").
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position. logits (B, T, V), labels (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution per position. (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020).

    With log r = ref_logp - logp:
    - k1 = -log r: unbiased, can be negative per token; the classic RLHF penalty.
    - k2 = (log r)^2 / 2: biased, always >= 0, low variance.
    - k3 = (r - 1) - log r: unbiased and always >= 0 (used as a loss term by GRPO).
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def sequence_end_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real response token per row. (B, T) -> (B,); 0 for empty rows."""
    lengths = mask.sum(1).long()
    return (lengths - 1).clamp(min=0)


def compute_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                    mask: torch.Tensor, beta: float, estimator: str = "k1"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token reward: -beta * KL_t everywhere, plus the sequence score on its last token.

    scores (B,), logp/ref_logp/mask (B, T) -> rewards (B, T), kl (B, T). Ziegler et al. 2019 eq. 2.
    """
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -beta * kl
    end = sequence_end_index(mask)
    rewards = rewards.scatter_add(1, end.unsqueeze(1), scores.unsqueeze(1).to(rewards.dtype))
    return rewards * mask, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1};
    V and A past the last real token are 0 (the episode ends at EOS or at truncation).
    rewards, values, mask (B, T) -> advantages (B, T), returns = advantages + values (B, T).
    """
    values = values * mask
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    returns = advantages + values
    return advantages * mask, returns * mask


@dataclass
class PolicyLossOut:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor  # k3 estimate of KL(old || new) between PPO epochs


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> PolicyLossOut:
    """PPO clipped surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 +- eps))."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    # approx KL http://joschu.net/blog/kl-approx.html (k3), as in CleanRL's ppo.py
    approx_kl = masked_mean(ratio - 1 - log_ratio, mask)
    return PolicyLossOut(loss, clipfrac.detach(), approx_kl.detach())


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_value: float | None = 0.2
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean.

    ``clip_range_value=None`` disables clipping. Returns (loss, share of clipped positions).
    """
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    v_clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over masked positions; 1 is a perfect critic, <= 0 useless."""
    var_r = masked_var(returns, mask, unbiased=False)
    if var_r <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_r)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, init_kl_coef: float):
        self.value = init_kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, sec 2.2: beta <- beta * (1 + K_beta * e), e = clip(KL/target - 1, +-0.2).

    K_beta = n_steps / horizon: the controller moves beta by at most 20% per ``horizon``
    episodes, so KL tracks ``target`` without oscillating.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
