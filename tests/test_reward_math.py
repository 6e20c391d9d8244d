"""models/reward.py against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from models.reward import (RewardNorm, expected_calibration_error, fit_temperature,
                           pairwise_loss, preference_accuracy, preference_nll, score_sequences)


def softplus(x: float) -> float:
    return math.log(1 + math.exp(-x))  # -log sigmoid(x)


def test_pairwise_loss_matches_log1p_exp():
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # diffs 1 and -1: mean of log(1 + e^-1) and log(1 + e^1)
    expected = (softplus(1.0) + softplus(-1.0)) / 2
    assert pairwise_loss(rc, rr).item() == pytest.approx(expected, abs=1e-6)
    # margin 0.5 and 0: diffs 0.5 and -1
    margin = torch.tensor([0.5, 0.0])
    expected = (softplus(0.5) + softplus(-1.0)) / 2
    assert pairwise_loss(rc, rr, margin).item() == pytest.approx(expected, abs=1e-6)
    # equal rewards: log 2
    assert pairwise_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_preference_accuracy_counts_strict_wins():
    rc, rr = torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 3.0, 1.0])
    assert preference_accuracy(rc, rr) == pytest.approx(0.5)


def test_preference_nll_hand_value():
    diffs, labels = torch.tensor([2.0]), torch.tensor([0.75])
    # -(0.75 log s(1) + 0.25 log s(-1)) at T = 2
    expected = 0.75 * softplus(1.0) + 0.25 * softplus(-1.0)
    assert preference_nll(diffs, labels, temperature=2.0) == pytest.approx(expected, abs=1e-6)


def test_fit_temperature_recovers_known_temperature():
    gen = torch.Generator().manual_seed(0)
    diffs = torch.randn(4000, generator=gen) * 3
    true_t = 2.5
    soft = torch.sigmoid(diffs / true_t)  # labels exactly calibrated at T = 2.5
    assert fit_temperature(diffs, soft) == pytest.approx(true_t, rel=1e-3)
    # Hard labels sampled from the same model: T recovered up to sampling noise.
    hard = torch.bernoulli(soft, generator=gen)
    assert fit_temperature(diffs, hard) == pytest.approx(true_t, rel=0.15)


def test_fit_temperature_is_clamped_when_separable():
    # All pairs right with certainty: NLL decreases as T -> 0; the bound stops it.
    assert fit_temperature(torch.tensor([1.0, 2.0]), torch.ones(2)) == pytest.approx(1e-2, rel=1e-6)


def test_ece_by_hand():
    probs = torch.tensor([0.05, 0.15, 0.12, 0.95, 1.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    # bin 0: {0.05} gap 0.05; bin 1: {0.15, 0.12} mean 0.135 vs 0.5, gap 0.365;
    # bin 9 (closed at 1.0): {0.95, 1.0} mean 0.975 vs 0.5, gap 0.475
    expected = (1 * 0.05 + 2 * 0.365 + 2 * 0.475) / 5
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    assert expected_calibration_error(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == 0.0


def test_reward_norm_roundtrip(tmp_path):
    norm = RewardNorm(temperature=2.0, mean=1.0, std=4.0)
    norm.save(tmp_path, extra={"eval_accuracy": 0.9})
    loaded = RewardNorm.load(tmp_path)
    assert loaded == norm
    assert torch.allclose(loaded.normalize(torch.tensor([1.0, 5.0, -3.0])),
                          torch.tensor([0.0, 1.0, -1.0]))
    assert loaded.preference_prob(torch.tensor([2.0]), torch.tensor([0.0])).item() == \
        pytest.approx(1 / (1 + math.exp(-1)))


@pytest.fixture(scope="module")
def tiny_scorer():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    # pad == eos on purpose: scoring must not depend on pad_token_id.
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                        num_labels=1, pad_token_id=0, eos_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


def test_score_sequences_same_for_left_right_and_no_padding(tiny_scorer):
    seq = torch.tensor([5, 7, 9, 11, 0])  # ends with eos == pad
    other = torch.tensor([3, 4, 6, 8, 10, 12, 14, 0])
    with torch.no_grad():
        alone = score_sequences(tiny_scorer, seq[None], torch.ones(1, 5, dtype=torch.long))
        other_alone = score_sequences(tiny_scorer, other[None], torch.ones(1, 8, dtype=torch.long))
        pad = torch.zeros(3, dtype=torch.long)
        right = torch.stack([torch.cat([seq, pad]), other])
        left = torch.stack([torch.cat([pad, seq]), other])
        mask_right = torch.stack([torch.cat([torch.ones(5), torch.zeros(3)]), torch.ones(8)]).long()
        mask_left = torch.stack([torch.cat([torch.zeros(3), torch.ones(5)]), torch.ones(8)]).long()
        s_right = score_sequences(tiny_scorer, right, mask_right)
        s_left = score_sequences(tiny_scorer, left, mask_left)
    assert s_right.shape == (2,)
    assert torch.allclose(s_right[0], alone[0], atol=1e-5)
    assert torch.allclose(s_left[0], alone[0], atol=1e-5)
    assert torch.allclose(s_right[1], other_alone[0], atol=1e-5)
    assert torch.allclose(s_left[1], other_alone[0], atol=1e-5)


def test_score_sequences_reads_the_last_attended_token(tiny_scorer):
    ids = torch.tensor([[5, 7, 9, 0]])
    mask = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        hidden = tiny_scorer.transformer(input_ids=ids).last_hidden_state  # (1, 4, H)
        expected = tiny_scorer.score(hidden)[0, -1, 0]  # the final EOS, even though eos == pad
        assert score_sequences(tiny_scorer, ids, mask)[0].item() == pytest.approx(expected.item(), abs=1e-6)
