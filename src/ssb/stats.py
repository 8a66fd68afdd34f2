"""Intervals over seeds and problems: a crossed (seeds x clusters of problems) bootstrap, and the plain sentence
that states what a difference between two models does and does not show.

Why not `ssb.metrics.paired_bootstrap` alone: an experiment trains each arm under several seeds and evaluates every
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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
