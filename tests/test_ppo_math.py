"""PPO/KL math against values computed by hand and against plain loops."""

import math

import pytest
import torch

from models.ppo import (AdaptiveKLController, FixedKLController, compute_gae, compute_rewards,
                        entropy_from_logits, explained_variance, kl_estimate,
                        logprobs_from_logits, masked_mean, masked_var, masked_whiten,
                        policy_loss, value_loss)
from models.rollout import position_ids_from_mask, response_mask_from_ids


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    # values 1, 2, 3: unbiased variance 1
    assert masked_var(x, m).item() == pytest.approx(1.0)


def test_whiten_shift_and_no_shift():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)
    assert w[0, 3].item() == 0.0
    w2 = masked_whiten(x, m, shift_mean=False)
    assert w2[0, :3].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-4)  # mean 2 kept, std 1


def test_logprobs_and_entropy_uniform():
    logits = torch.zeros(1, 2, 4)
    labels = torch.tensor([[0, 3]])
    assert logprobs_from_logits(logits, labels)[0].tolist() == pytest.approx([-math.log(4)] * 2)
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx([math.log(4)] * 2)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log r = log(0.25/0.5) = -log 2
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 - 1 + math.log(2))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_unbiased_kl_estimators_match_exact_kl(estimator):
    """k1 and k3 averaged over samples of p converge to the exact KL(p || q)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.4, 0.4])
    exact = float((p * (p / q).log()).sum())
    # Expectation under p computed exactly by weighting each outcome by its probability.
    est = float((p * kl_estimate(p.log(), q.log(), estimator)).sum())
    assert est == pytest.approx(exact, abs=1e-6)
    # k2 is biased: its expectation differs from the exact KL here.
    k2 = float((p * kl_estimate(p.log(), q.log(), "k2")).sum())
    assert abs(k2 - exact) > 1e-3


def test_compute_rewards_puts_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-2.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = compute_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    # k1 per token = logp - ref: row0 [0.5, 0, 1.0]; row1 [1.0, 0, (masked)]
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, -0.1 + 2.0], [-0.1, -1.0, 0.0]]))


def gae_loop(rewards, values, mask, gamma, lam):
    """Plain per-row loop: the episode ends at its last real token."""
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * nv - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_hand_computed():
    r = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25]])
    m = torch.ones(1, 2)
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.5)
    # t=1: delta = 1 - 0.25 = 0.75 -> A1 = 0.75
    # t=0: delta = 0 + 0.9*0.25 - 0.5 = -0.275 -> A0 = -0.275 + 0.45*0.75 = 0.0625
    assert torch.allclose(adv, torch.tensor([[0.0625, 0.75]]))
    assert torch.allclose(ret, torch.tensor([[0.5625, 1.0]]))


def test_gae_matches_plain_loop_with_padding():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 6])
    m = (torch.arange(7)[None, :] < lengths[:, None]).float()
    adv, ret = compute_gae(r * m, v, m, gamma=0.99, lam=0.95)
    adv2, ret2 = gae_loop(r * m, v * m, m, 0.99, 0.95)
    assert torch.allclose(adv, adv2, atol=1e-5)
    assert torch.allclose(ret, ret2, atol=1e-5)
    # Padding values never leak into real positions.
    v_noisy = v + (1 - m) * 1e3
    adv3, _ = compute_gae(r * m, v_noisy, m, 0.99, 0.95)
    assert torch.allclose(adv, adv3, atol=1e-4)


def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    m = torch.ones(1, 3)
    out = policy_loss(new, old, adv, m, clip_range=0.2)
    # token0: ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped)
    # token1: ratio 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    # token2: ratio 1.1, A=2: max(-2.2, -2.2) = -2.2 (not clipped)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-5)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    # approx KL (k3 of old||new in ratio form): mean(r - 1 - log r)
    expect = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1)) / 3
    assert out.approx_kl.item() == pytest.approx(expect, abs=1e-5)


def test_policy_loss_ignores_masked_tokens():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.1, 5.0]])
    adv = torch.tensor([[1.0, 100.0]])
    a = policy_loss(new, old, adv, torch.tensor([[1.0, 0.0]]))
    b = policy_loss(new[:, :1], old[:, :1], adv[:, :1], torch.ones(1, 1))
    assert a.loss.item() == pytest.approx(b.loss.item())


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.0]])
    v_old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    m = torch.ones(1, 2)
    loss, clipfrac = value_loss(v, v_old, ret, m, clip_range_value=0.2)
    # t0: unclipped (1-0)^2 = 1; clipped V = 0.7 -> 0.49; max = 1
    # t1: unclipped 1, clipped V = 0 -> 1; max = 1
    assert loss.item() == pytest.approx(0.5 * (1 + 1) / 2)
    assert clipfrac.item() == 0.0
    loss2, _ = value_loss(v, v_old, ret, m, clip_range_value=None)
    assert loss2.item() == pytest.approx(0.5)


def test_value_clipping_changes_loss_and_gradient_by_hand():
    """Where V left V_old +- eps in the direction of the return, the clipped (larger) loss wins
    and that token's gradient is 0: the critic may not move further than eps per batch."""
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    v_old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    m = torch.ones(1, 2)
    loss, clipfrac = value_loss(v, v_old, ret, m, clip_range_value=0.2)
    # t0: unclipped (1 - 2)^2 = 1; V clipped to 0.5 + 0.2 = 0.7 -> (0.7 - 2)^2 = 1.69; max 1.69
    # t1: V = V_old: both (0 - 1)^2 = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    loss.backward()
    # t0: clamp saturated, no gradient; t1: d/dV 0.5 * (V - R)^2 / 2 = (V - R) / 2 = -0.5
    assert v.grad[0].tolist() == pytest.approx([0.0, -0.5])

    v.grad = None
    loss, clipfrac = value_loss(v, v_old, ret, m, clip_range_value=None)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    assert clipfrac.item() == 0.0
    loss.backward()
    assert v.grad[0].tolist() == pytest.approx([-0.5, -0.5])  # t0 now (1 - 2) / 2 too


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3)
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 3) + 2.0, ret, m) == pytest.approx(0.0)


def test_adaptive_kl_controller_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)  # error = clip(0.5, +-0.2) = 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    ctl.update(current_kl=5.4, n_steps=1000)  # error = -0.1
    assert ctl.value == pytest.approx(0.1 * 1.02 * (1 - 0.01))
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.1
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, ended = response_mask_from_ids(ids, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False]


def test_position_ids_ignore_left_padding():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(m).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_pad_sequences_left_and_right():
    from models.rollout import pad_sequences

    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_sequences([[5, 6, 7], [8]], pad_id=9, left=False)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_sequences([[], []], pad_id=0, left=False)  # nothing: one padding column
    assert ids.shape == (2, 1) and mask.sum() == 0


def test_left_pad_episodes_by_hand():
    from models.rollout import left_pad_episodes

    q = torch.tensor([[0, 0, 5], [0, 8, 9]])  # left-padded prompts (pad 0)
    qm = torch.tensor([[0, 0, 1], [0, 1, 1]])
    r = torch.tensor([[3, 4, 6], [2, 1, 1]])  # right-padded responses (pad 1)
    rm = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ids, mask = left_pad_episodes(q, qm, r, rm)
    # episodes 5 3 4 6 and 8 9 2: 4 columns, not 3 + 3; the padding keeps its own ids
    assert ids.tolist() == [[5, 3, 4, 6], [1, 8, 9, 2]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    # at least T + 1 columns, so the first response token has a column before it
    ids, mask = left_pad_episodes(torch.tensor([[5]]), torch.tensor([[1]]),
                                  torch.tensor([[3, 1]]), torch.tensor([[1.0, 0.0]]))
    assert ids.tolist() == [[1, 5, 3]] and mask.tolist() == [[0, 1, 1]]


def test_left_pad_episodes_to_a_width_multiple_by_hand():
    from models.rollout import left_pad_episodes, round_width

    assert [round_width(w, 16) for w in (1, 7, 16, 17)] == [16, 16, 16, 32]
    assert round_width(7, 16, cap=10) == 10 and round_width(12, 16, cap=10) == 12
    assert round_width(5, 1) == 5
    q, qm = torch.tensor([[0, 0, 5], [0, 8, 9]]), torch.tensor([[0, 0, 1], [0, 1, 1]])
    r, rm = torch.tensor([[3, 4, 6], [2, 1, 1]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # 4 real columns -> 5: one more padding column, taken from the episodes' own
    ids, mask = left_pad_episodes(q, qm, r, rm, multiple=5)
    assert ids.tolist() == [[0, 5, 3, 4, 6], [1, 1, 8, 9, 2]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    # -> 8, past the 6 columns prompt and response have: id 0 in front, masked
    ids, mask = left_pad_episodes(q, qm, r, rm, multiple=8)
    assert ids.tolist() == [[0, 0, 0, 0, 5, 3, 4, 6], [0, 0, 0, 1, 1, 8, 9, 2]]
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    assert left_pad_episodes(q, qm, r, rm, multiple=4)[0].shape == (2, 4)


def test_left_align_responses_by_hand():
    from models.rollout import left_align_responses

    x = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    rm = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # row 0 (2 tokens) ends at the last column: tokens at 2, 3; padding repeats column 3
    assert left_align_responses(x, rm).tolist() == [[12, 13, 13, 13], [20, 21, 22, 23]]


def test_sample_from_probs_by_hand():
    from models.rollout import sample_from_probs

    probs = torch.tensor([[0.2, 0.5, 0.3]]).expand(6, 3)
    u = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.7, 0.999])  # cdf 0.2, 0.7, 1.0
    assert sample_from_probs(probs, u).tolist() == [0, 0, 1, 1, 2, 2]
    # a zero-probability token is never drawn, even at u = 0; unnormalised rows are scaled
    assert sample_from_probs(torch.tensor([[0.0, 2.0, 2.0]]), torch.tensor([0.0])).tolist() == [1]
    assert sample_from_probs(torch.tensor([[0.0, 2.0, 2.0]]), torch.tensor([0.5])).tolist() == [2]
    # an even grid of 1000 uniforms lands in proportion to the probabilities
    grid = (torch.arange(1000) + 0.5) / 1000
    drawn = sample_from_probs(torch.tensor([[0.1, 0.6, 0.3]]).expand(1000, 3), grid)
    assert torch.bincount(drawn, minlength=3).tolist() == [100, 600, 300]
