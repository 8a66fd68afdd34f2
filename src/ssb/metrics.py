"""Evaluation statistics: pass@k, majority vote, confidence intervals and paired significance tests.

Pure functions over plain numbers (no scipy; numpy for the bootstrap over seeds and problems): the eval stage
and `ssb compare` build on them, and every formula is checkable by hand. Conventions:

- A *problem* is the unit of sampling. With n samples per problem, a problem's pass@1 is its share of correct
  samples; a benchmark's pass@1 is the mean of those shares over problems.
- Confidence intervals are two-sided at `level` (default 95%). `wilson_ci` is for one Bernoulli trial per
  problem (n = 1); `mean_ci` is the normal approximation for per-problem scores in [0, 1] (n > 1).
- Paired tests compare two runs on the *same* problems: `paired_bootstrap` resamples problems (the pairing is
  kept), `mcnemar_exact` counts problems where exactly one run is right (n = 1 only).

Intervals over seeds and problems (`crossed_bootstrap`, `paired_crossed_bootstrap`, used by `ssb experiment`
and the findings of `ssb run`), and the plain sentence that states what a difference does and does not show.
Why not `paired_bootstrap` alone: an experiment trains each arm under several seeds and evaluates every
seed's model on the same held-out problems, and those problems come in clusters (the built-in arithmetic problems
repeat calculations: "3 + 5" in several wordings). Two sources of uncertainty are crossed:

- seeds: another seed gives another model (rollouts, curation picks, teacher samples, LoRA init, data order);
- problems: another draw of held-out problems gives another score; problems of one cluster are not independent.

`crossed_bootstrap` resamples both: each replicate draws S seeds with replacement and C clusters with replacement
(one cluster draw shared by all seeds and all arms of the replicate, since every seed is scored on the same
problems; drawing clusters independently per seed would count the same problems' difficulty as S independent
samples and make the interval too narrow). The statistic is, per drawn seed, the mean score over the problems of
the drawn clusters (a ratio: sum of their scores / their number), averaged over the drawn seeds. Differences
between arms apply the same draws to both arms (paired). Percentile intervals; numpy, seeded.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def _z(level: float) -> float:
    """Two-sided normal quantile: 1.96 for 95%."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), the chance that k samples drawn without replacement include a correct one.

    >>> pass_at_k(10, 3, 1)          # = c / n
    0.3
    >>> round(pass_at_k(4, 1, 2), 4)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    >>> pass_at_k(5, 4, 2)            # fewer than k wrong samples: any k include a correct one
    1.0
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    total = math.comb(n, k)  # exact integers, one rounding at the end
    return (total - math.comb(n - c, k)) / total


def wilson_ci(successes: float, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion. Unlike p +- z*se it stays inside [0, 1] and has
    non-zero width at 0/N and N/N, so it is the right interval for pass@1 with one sample per problem.

    >>> [round(x, 4) for x in wilson_ci(8, 10)]
    [0.4902, 0.9433]
    >>> [round(x, 4) for x in wilson_ci(0, 20)]
    [0.0, 0.1611]
    """
    if total <= 0:
        raise ValueError(f"wilson_ci needs total >= 1, got {total}")
    if not 0 <= successes <= total:
        raise ValueError(f"wilson_ci needs 0 <= successes <= total, got {successes} of {total}")
    z = _z(level)
    p = successes / total
    denom = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # the bounds at 0/N and N/N are exactly 0 and 1; computing them leaves rounding dust like 1e-17
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == total else min(1.0, center + half)
    return lo, hi


def mean_ci(
    values: Sequence[float], level: float = 0.95, clip: tuple[float, float] | None = (0.0, 1.0)
) -> tuple[float, float]:
    """Normal-approximation interval for a mean: mean +- z * s / sqrt(m), s the sample standard deviation
    (ddof 1) of the m values. Clipped to `clip` (scores are shares in [0, 1]); pass None to keep it raw.
    With fewer than two values, or identical values, the width is 0: callers fall back to `wilson_ci`.

    >>> [round(x, 4) for x in mean_ci([0.0, 0.5, 1.0, 0.5])]
    [0.0999, 0.9001]
    >>> mean_ci([0.25, 0.25])
    (0.25, 0.25)
    """
    m = len(values)
    if m == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / m
    if m == 1:
        return mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (m - 1))
    half = _z(level) * sd / math.sqrt(m)
    lo, hi = mean - half, mean + half
    if clip is not None:
        lo, hi = max(clip[0], lo), min(clip[1], hi)
    return lo, hi


def majority_vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most common answer, ignoring None (unparsed samples). Ties go to the answer whose first
    occurrence comes earliest, so the vote is deterministic. None if no sample has an answer.

    >>> majority_vote(["3", "5", "5", None, None, None])
    '5'
    >>> majority_vote(["7", "2", "2", "7"])   # tie: "7" appeared first
    '7'
    >>> majority_vote([None, None]) is None
    True
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: b = problems only run A got right, c = problems only run B got right.
    Under "no difference" each discordant problem is a fair coin, so p = P(Binomial(b+c, 1/2) at least as
    far from (b+c)/2 as observed) = min(1, 2 * sum_{i <= min(b,c)} C(b+c, i) / 2^(b+c)).

    >>> mcnemar_exact(1, 6)   # 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128
    0.125
    >>> mcnemar_exact(0, 0)
    1.0
    >>> mcnemar_exact(5, 5)
    1.0
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact needs non-negative counts, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 10000, seed: int = 0, level: float = 0.95
) -> dict:
    """Paired bootstrap of mean(a) - mean(b), where a[i] and b[i] score the same problem i.

    Resamples problems with replacement `iters` times (numpy, seeded: same inputs -> same output) and
    returns {"diff", "low", "high", "p", "iters"}: the observed difference, the percentile interval at
    `level`, and a two-sided bootstrap p-value (twice the share of resampled differences on the far side
    of 0, at most 1; its resolution is 1/iters).

    >>> r = paired_bootstrap([1, 1, 1, 0], [0, 0, 1, 0], iters=2000)
    >>> r["diff"], r["low"] >= 0.0, r["high"] <= 1.0
    (0.5, True, True)
    >>> paired_bootstrap([1, 0], [1, 0], iters=100)["p"]   # identical runs: no difference at all
    1.0
    """
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs equally long score lists, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired_bootstrap needs at least one problem")
    if iters < 1:
        raise ValueError(f"paired_bootstrap needs iters >= 1, got {iters}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)  # [m] per-problem difference
    m = len(d)
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, 2_000_000 // m)  # bound memory: chunk x m indices at a time
    for start in range(0, iters, chunk):
        rows = min(chunk, iters - start)
        idx = rng.integers(0, m, size=(rows, m))  # [rows, m]
        means[start : start + rows] = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    diff = float(d.mean())
    if np.all(d == d[0]):  # every resample gives the same difference
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = min(1.0, 2 * min(float(np.mean(means <= 0)), float(np.mean(means >= 0))))
    return {
        "diff": diff,
        "low": float(np.quantile(means, alpha)),
        "high": float(np.quantile(means, 1 - alpha)),
        "p": p,
        "iters": iters,
    }


# ---------------------------------------------------------------------------------------------- seeds x problems


@dataclass(frozen=True)
class Scores:
    """Per-problem scores of one arm: `by_seed[s][problem id]` in [0, 1], and each problem's cluster."""

    by_seed: dict[int, dict[str, float]]
    cluster: dict[str, str]

    def mean(self) -> float:
        return float(np.mean([np.mean(list(v.values())) for v in self.by_seed.values()]))


def _design(arms: Sequence[Scores], seeds: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Cluster sums per arm [S, C] and problem counts per cluster [C], over the problems every arm scored."""
    ids = set.intersection(*(set(a.by_seed[s]) for a in arms for s in seeds))
    if not ids:
        raise ValueError("no problem is scored by every arm and seed")
    clusters = sorted({arms[0].cluster.get(i, i) for i in ids})
    col = {c: j for j, c in enumerate(clusters)}
    counts = np.zeros(len(clusters))
    for i in ids:
        counts[col[arms[0].cluster.get(i, i)]] += 1
    sums = []
    for a in arms:
        m = np.zeros((len(seeds), len(clusters)))  # [S, C]
        for si, s in enumerate(seeds):
            for i in ids:
                m[si, col[arms[0].cluster.get(i, i)]] += a.by_seed[s][i]
        sums.append(m)
    return sums, counts


def _replicates(sums: list[np.ndarray], counts: np.ndarray, iters: int, seed: int) -> list[np.ndarray]:
    """Each arm's statistic under the same `iters` crossed resamples -> [iters] per arm."""
    n_seeds, n_clusters = sums[0].shape
    rng = np.random.default_rng(seed)
    out = [np.empty(iters) for _ in sums]
    chunk = max(1, 1_000_000 // (n_clusters + n_seeds))
    for start in range(0, iters, chunk):
        rows = min(chunk, iters - start)
        seed_idx = rng.integers(0, n_seeds, size=(rows, n_seeds))  # [R, S] drawn seeds
        weights = rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=rows)  # [R, C] draw counts
        denom = weights @ counts  # [R] problems in the drawn clusters
        for a, m in enumerate(sums):
            per_seed = (weights @ m.T) / denom[:, None]  # [R, S] each seed's mean over the drawn problems
            out[a][start : start + rows] = np.take_along_axis(per_seed, seed_idx, axis=1).mean(axis=1)
    return out


def replicates(arms: Sequence[Scores], seeds: Sequence[int], iters: int = 10000, seed: int = 0) -> list[np.ndarray]:
    """Each arm's statistic under the same `iters` resamples of seeds and clusters -> [iters] per arm."""
    sums, counts = _design(arms, seeds)
    return _replicates(sums, counts, iters, seed)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def crossed_bootstrap(
    arm: Scores, seeds: Sequence[int] | None = None, iters: int = 10000, seed: int = 0, level: float = 0.95
) -> dict:
    """{"mean", "low", "high", "iters", "seeds", "problems", "clusters"}: the mean over seeds of pass@1 and its
    percentile interval from resampling seeds and clusters of problems (module docstring)."""
    seeds = sorted(arm.by_seed) if seeds is None else list(seeds)
    (sums,), counts = _design([arm], seeds)
    (reps,) = _replicates([sums], counts, iters, seed)
    lo, hi = _interval(reps, level)
    mean = float((sums.sum(axis=1) / counts.sum()).mean())
    return {
        "mean": mean,
        "low": lo,
        "high": hi,
        "iters": iters,
        "seeds": len(seeds),
        "problems": int(counts.sum()),
        "clusters": len(counts),
    }


def paired_crossed_bootstrap(
    a: Scores, b: Scores, seeds: Sequence[int] | None = None, iters: int = 10000, seed: int = 0, level: float = 0.95
) -> dict:
    """mean(a) - mean(b) over the seeds both have, with the same resampled seeds and clusters for both:
    {"diff", "low", "high", "p", "iters", "seeds", "problems", "clusters"}; p is the two-sided bootstrap p-value
    (twice the share of resampled differences on the far side of 0, at most 1)."""
    seeds = sorted(set(a.by_seed) & set(b.by_seed)) if seeds is None else list(seeds)
    if not seeds:
        raise ValueError("the two arms share no seed")
    (sa, sb), counts = _design([a, b], seeds)
    ra, rb = _replicates([sa, sb], counts, iters, seed)
    d = ra - rb
    lo, hi = _interval(d, level)
    diff = float(((sa - sb).sum(axis=1) / counts.sum()).mean())
    if np.all(d == d[0]):
        p = 1.0 if d[0] == 0 else 0.0
    else:
        p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {
        "diff": diff,
        "low": lo,
        "high": hi,
        "p": p,
        "iters": iters,
        "seeds": len(seeds),
        "problems": int(counts.sum()),
        "clusters": len(counts),
    }


def difference_sentence(label: str, other: str, result: dict, *, clustered: bool, follow_up: str = "") -> str:
    """One plain sentence on `label` vs `other` from a paired bootstrap result (points = percentage points).

    >>> r = {"diff": 0.01, "low": -0.08, "high": 0.10, "seeds": 1}
    >>> difference_sentence("SSB", "base", r, clustered=True)  # doctest: +NORMALIZE_WHITESPACE
    'SSB vs base: +1.0 points, 95% CI [-8.0, +10.0] (paired bootstrap over problems, resampled by calculation):
    not distinguishable at this size.'
    """
    over = "seeds and problems" if result.get("seeds", 1) > 1 else "problems"
    how = "resampled by calculation" if clustered else "resampled by problem"
    head = (
        f"{label} vs {other}: {100 * result['diff']:+.1f} points, 95% CI [{100 * result['low']:+.1f}, "
        f"{100 * result['high']:+.1f}] (paired bootstrap over {over}, {how})"
    )
    if result["low"] > 0:
        verdict = f"{label} is better"
    elif result["high"] < 0:
        verdict = f"{label} is worse"
    else:
        verdict = "not distinguishable at this size"
    return f"{head}: {verdict}" + (f"; {follow_up}" if follow_up else "") + "."
