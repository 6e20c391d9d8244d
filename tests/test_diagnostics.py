"""Evaluation diagnostics against values computed by hand and against plain loops."""

import math

import pytest
import torch

from models.diagnostics import (bootstrap_ci, distinct_n, length_matched_win_rate,
                                longer_preferred, pearson, per_prompt_wins, rankdata,
                                repetition_rate, slope, spearman, win_indicator)


def test_per_prompt_wins_by_hand():
    a = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 1.0], [4.0, 4.0]])
    b = torch.tensor([[2.0, 2.0], [1.0, 4.0], [5.0, 5.0], [1.0, 1.0]])
    # means a: [2, 2, 0.5, 4]; b: [2, 2.5, 5, 1] -> tie, loss, loss, win
    assert per_prompt_wins(a, b).tolist() == [0.5, 0.0, 0.0, 1.0]
    assert win_indicator(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])).tolist() \
        == [1.0, 0.5, 0.0]


def test_bootstrap_two_prompts_by_hand():
    # Wins [0, 1]: a replicate mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4.
    # The 2.5% and 97.5% quantiles fall inside the masses at 0 and at 1; the 30% and 70%
    # quantiles (alpha = 0.6) both fall inside the mass at 0.5 (which spans 25%..75%).
    wins = torch.tensor([0.0, 1.0])
    assert bootstrap_ci(wins) == (0.5, 0.0, 1.0)
    assert bootstrap_ci(wins, alpha=0.6) == (0.5, 0.5, 0.5)
    assert bootstrap_ci(torch.ones(7)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(torch.zeros(0))


def test_bootstrap_is_deterministic_given_seed():
    # Continuous wins in [0, 1] (e.g. shares of samples won), so replicate means rarely tie
    # and another seed moves the quantiles.
    wins = torch.rand(50, generator=torch.Generator().manual_seed(1))
    assert bootstrap_ci(wins, seed=3) == bootstrap_ci(wins, seed=3)
    assert bootstrap_ci(wins, seed=3) != bootstrap_ci(wins, seed=4)


def test_bootstrap_ci_contains_mean_and_narrows_with_more_prompts():
    def alternating(n):  # 0, 1, 0, 1, ...: mean 0.5, per-prompt sd 0.5
        return (torch.arange(n) % 2).float()

    mean, lo, hi = bootstrap_ci(alternating(400))
    assert mean == 0.5 and lo < mean < hi
    # Normal approximation: half-width 1.96 * 0.5 / sqrt(400) = 0.049, so width ~ 0.098.
    assert hi - lo == pytest.approx(0.098, abs=0.012)
    _, lo_small, hi_small = bootstrap_ci(alternating(40))
    _, lo_big, hi_big = bootstrap_ci(alternating(1000))
    # 25x the prompts: ~5x narrower (sd / sqrt(N)).
    assert (hi_big - lo_big) < (hi_small - lo_small) / 3


def test_pearson_by_hand_and_constant_is_nan():
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])
    # dx = [-1, 0, 1], dy = [-4/3, -1/3, 5/3]; sum dx dy = 3, sum dx^2 = 2,
    # sum dy^2 = 42/9 -> r = 3 / sqrt(2 * 42/9) = 0.981981
    assert pearson(x, y) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.full((3,), 5.0)))
    assert math.isnan(pearson(torch.zeros(3), y))
    assert math.isnan(pearson(torch.tensor([1.0]), torch.tensor([2.0])))
    with pytest.raises(ValueError):
        pearson(x, y[:2])


def test_rankdata_averages_ties():
    # sorted: 1 (rank 1), 2 (rank 2), 3, 3 (ranks 3 and 4 -> 3.5 each)
    assert rankdata(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_by_hand_with_ties():
    x, y = torch.tensor([10.0, 20.0, 20.0, 30.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; both mean 2.5
    # dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5]
    # sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> rho = 4.5 / sqrt(22.5) = 0.948683
    assert spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))
    # Monotone but not linear: rank correlation 1, Pearson below 1.
    z = torch.arange(1.0, 9.0)
    assert spearman(z, z**3) == pytest.approx(1.0)
    assert pearson(z, z**3) < 0.95
    assert math.isnan(spearman(z, torch.ones(8)))


def spearman_loop(x, y):
    """Average ranks by counting, then Pearson, in plain Python."""
    def ranks(v):
        return [sum(u < a for u in v) + (sum(u == a for u in v) + 1) / 2 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def test_spearman_matches_plain_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randint(0, 6, (40,), generator=g).float()  # many ties
        y = x + torch.randint(-3, 4, (40,), generator=g).float()
        assert spearman(x, y) == pytest.approx(spearman_loop(x.tolist(), y.tolist()), abs=1e-12)


def test_length_matched_win_rate_by_hand():
    # One prompt, k = 2. Candidate (score, len): (3, 10), (1, 20); baseline: (2, 11), (5, 30).
    # |dlen| <= 2 keeps only (a0, b0): 3 > 2 -> win. With tolerance 10: (a0, b0) win, (a1, b0)
    # |20-11| = 9 -> 1 < 2 loss, (a1, b1) |20-30| = 10 -> 1 < 5 loss: 1/3 over 3 pairs.
    a, a_len = torch.tensor([[3.0, 1.0]]), torch.tensor([[10.0, 20.0]])
    b, b_len = torch.tensor([[2.0, 5.0]]), torch.tensor([[11.0, 30.0]])
    assert length_matched_win_rate(a, b, a_len, b_len, tolerance=2) == (1.0, 1)
    rate, n = length_matched_win_rate(a, b, a_len, b_len, tolerance=10)
    assert n == 3 and rate == pytest.approx(1 / 3)
    # Ties in score count half; pairs of other prompts never mix.
    two = length_matched_win_rate(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [9.0]]),
                                  torch.tensor([[5.0], [5.0]]), torch.tensor([[5.0], [50.0]]))
    assert two == (0.5, 1)


def test_length_matched_win_rate_without_overlap_is_nan():
    # The candidate always answers 24 tokens, the baseline about 10: nothing to match.
    rate, n = length_matched_win_rate(torch.ones(4, 2), torch.zeros(4, 2),
                                      torch.full((4, 2), 24.0), torch.full((4, 2), 10.0))
    assert math.isnan(rate) and n == 0


def test_longer_preferred_by_hand():
    # Pairs (score_a, score_b, len_a, len_b): (2, 1, 9, 5) longer a wins -> 1;
    # (0, 1, 9, 5) longer a loses -> 0; (1, 3, 4, 8) longer b wins -> 1;
    # (1, 1, 3, 6) tie -> 0.5; (5, 0, 7, 7) equal lengths, skipped. Mean 2.5 / 4.
    sa, sb = torch.tensor([2.0, 0.0, 1.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 1.0, 0.0])
    la, lb = torch.tensor([9, 9, 4, 3, 7]), torch.tensor([5, 5, 8, 6, 7])
    assert longer_preferred(sa, sb, la, lb) == pytest.approx(2.5 / 4)
    assert math.isnan(longer_preferred(sa[4:], sb[4:], la[4:], lb[4:]))
    # A score that is length itself: 1.
    assert longer_preferred(la.float(), lb.float(), la, lb) == 1.0


def test_distinct_n_by_hand():
    texts = ["the cat sat", "The cat ran"]
    # bigrams: (the cat) (cat sat) (the cat) (cat ran): 3 unique of 4 (case folded)
    assert distinct_n(texts, n=2) == pytest.approx(3 / 4)
    # unigrams: the cat sat the cat ran: 4 unique of 6
    assert distinct_n(texts, n=1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "d e f"], n=2) == 1.0
    assert distinct_n(["hi", ""], n=2) == 0.0  # no bigram at all
    assert distinct_n([], n=2) == 0.0


def test_repetition_rate_by_hand():
    # bigrams (great great) x3: 1 unique of 3 -> 1 - 1/3
    assert repetition_rate("great great great great") == pytest.approx(2 / 3)
    # bigrams: (a b) (b a) (a b) (b c): 3 unique of 4 -> 1/4
    assert repetition_rate("a b a b c") == pytest.approx(1 / 4)
    assert repetition_rate("one") == 0.0
    # case-insensitive: (it is) (is good) (good good) (good good) (good good): 3 unique of 5
    assert repetition_rate("It is Good good GOOD good") == pytest.approx(2 / 5)
    # unigrams: the x7 -> 1 unique of 7; trigrams of "a b a b a b": 2 unique of 4
    assert repetition_rate("the the the the the the the", n=1) == pytest.approx(6 / 7)
    assert repetition_rate("a b a b a b", n=3) == pytest.approx(1 / 2)


def test_slope_by_hand():
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    # t = 0, 1, 2 (mean 1), v = 2, 0, 4 (mean 2): sum dt dv = (-1)(0) + 0 + (1)(2) = 2,
    # sum dt^2 = 2 -> slope 1
    assert slope(torch.tensor([2.0, 0.0, 4.0])) == pytest.approx(1.0)
    assert slope([7.0, 7.0, 7.0, 7.0]) == 0.0
    assert slope([-1.0, -2.0, -3.5]) == pytest.approx(-1.25)  # (-1)(1) + (1)(-1.5) over 2
    assert math.isnan(slope([3.0]))
    assert math.isnan(slope([]))
