"""ssb.metrics against closed forms, hand-computed values and brute-force enumeration."""

from __future__ import annotations

import doctest
import itertools
import math

import pytest

import ssb.metrics as metrics
from ssb.metrics import majority_vote, mcnemar_exact, mean_ci, paired_bootstrap, pass_at_k, wilson_ci

Z95 = 1.959963984540054


def test_docstring_examples():
    result = doctest.testmod(metrics)
    assert result.attempted >= 15 and result.failed == 0


def test_pass_at_k_matches_enumeration():
    # pass@k = share of k-subsets of the n samples that contain at least one correct sample
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms():
    assert pass_at_k(10, 3, 1) == 0.3  # c / n, exactly
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(100, 5, 10) == pytest.approx(1 - math.prod((95 - i) / (100 - i) for i in range(10)))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_by_hand():
    # 8/10: center (0.8 + z²/20) / (1 + z²/10), half-width z*sqrt(0.016 + z²/400) / (1 + z²/10)
    lo, hi = wilson_ci(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # 0/N: upper bound z² / (N + z²); N/N: lower bound N / (N + z²)
    assert wilson_ci(0, 20) == (0.0, pytest.approx(Z95**2 / (20 + Z95**2)))
    assert wilson_ci(10, 10) == (pytest.approx(10 / (10 + Z95**2)), 1.0)
    # symmetric under success <-> failure
    lo3, hi3 = wilson_ci(3, 10)
    lo7, hi7 = wilson_ci(7, 10)
    assert (lo3, hi3) == (pytest.approx(1 - hi7), pytest.approx(1 - lo7))
    # a higher level gives a wider interval
    lo99, hi99 = wilson_ci(8, 10, level=0.99)
    assert lo99 < lo and hi99 > hi
    with pytest.raises(ValueError):
        wilson_ci(3, 0)
    with pytest.raises(ValueError):
        wilson_ci(11, 10)


def test_mean_ci_known_data():
    values = [0.0, 0.5, 1.0, 0.5]  # mean 0.5, sample sd sqrt(0.5/3)
    half = Z95 * math.sqrt(0.5 / 3) / 2
    assert mean_ci(values) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert mean_ci([0.25, 0.25]) == (0.25, 0.25)
    # clipped to [0, 1] by default, raw on request
    lo, hi = mean_ci([0.0, 0.0, 0.0, 1.0])
    assert lo == 0.0 and hi < 1.0
    raw_lo, _ = mean_ci([0.0, 0.0, 0.0, 1.0], clip=None)
    assert raw_lo < 0
    with pytest.raises(ValueError):
        mean_ci([])


def test_majority_vote_ties_and_unparsed():
    assert majority_vote(["3", "5", "5"]) == "5"
    assert majority_vote(["7", "2", "2", "7"]) == "7"  # tie: first occurrence wins
    assert majority_vote(["2", "7", "7", "2"]) == "2"
    assert majority_vote([None, "4", None, None]) == "4"  # unparsed samples do not vote
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_mcnemar_exact_small_tables():
    assert mcnemar_exact(1, 6) == pytest.approx(2 * 8 / 128)
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 1) == 1.0  # 2 * 1/2, capped
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    # against the binomial distribution summed directly: P(X <= 2) for X ~ Bin(12, 1/2), doubled
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_bootstrap_values():
    a = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 10
    b = [1, 0, 0, 1, 0, 0, 1, 0, 0, 1] * 10
    r = paired_bootstrap(a, b, iters=4000, seed=3)
    assert r["diff"] == pytest.approx(0.3)
    assert r["low"] < 0.3 < r["high"]
    # the percentile interval's half-width is close to the normal one, z * sd(d) / sqrt(m)
    d = [x - y for x, y in zip(a, b)]
    sd = math.sqrt(sum((v - 0.3) ** 2 for v in d) / (len(d) - 1))
    assert (r["high"] - r["low"]) / 2 == pytest.approx(Z95 * sd / math.sqrt(len(d)), rel=0.15)
    assert r["p"] < 0.01
    assert paired_bootstrap(a, b, iters=4000, seed=3) == r  # seeded: reproducible
    same = paired_bootstrap(a, a, iters=100)
    assert (same["diff"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap([1, 0], [1], iters=10)
