"""Answer extraction and verification: every correct/incorrect number SSB reports comes from here.

A completion is reduced to one answer string by an extraction policy (`ssb.verify.extract`), the
gold answer is normalised per source, and the two are compared:
  1. fast path, in process: when both sides are plain numbers (`2,125`, `025`, `27.0`, `3/4`,
     `\\frac{1}{2}`) they are compared exactly as fractions; most GSM8K / AIME / AMC answers end here.
  2. otherwise math-verify plus our guards (`ssb.verify.equiv.compare`) in a small pool of worker
     processes (`ssb.verify.worker`), each item with its own deadline; an item that overruns gets the verdict "timeout"
     and its worker is replaced, so one pathological answer costs at most `timeout` seconds.
Extraction is linear-time string work; it runs in process for texts up to `INLINE_CHARS` characters and inside
the worker, under the same deadline, for longer ones, so a verification of any input returns within its timeout
(plus the workers' start-up, paid once per pool).
Verdicts: "correct", "incorrect", "unparsed" (no answer could be extracted, or it did not parse and
did not match the gold as text) and "timeout".
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import asdict, dataclass

from ssb.verify.extract import (
    HOWS,
    INLINE_CHARS,
    POLICIES,
    Extraction,
    normalize_gold,
    prejudge,
)
from ssb.verify.worker import WorkerPool

VERDICTS = ("correct", "incorrect", "unparsed", "timeout")


@dataclass(frozen=True)
class Verdict:
    extracted: str | None
    rule: str | None
    verdict: str  # one of VERDICTS
    correct: bool
    policy: str

    def to_dict(self) -> dict:
        return asdict(self)


def _inline(text: str, gold: str, how: str) -> tuple[Extraction, str, str | None] | None:
    """`prejudge` in this process for a text short enough to extract here; None for a longer one (a worker
    extracts it, under the item's deadline)."""
    return prejudge(text, gold, how) if len(text) <= INLINE_CHARS else None


class Verifier:
    """Owns the worker pool; use as a context manager (or call `close`). Thread-safe: concurrent
    calls share the pool one batch at a time. The pool is also closed at interpreter exit."""

    def __init__(self, timeout: float = 5.0, workers: int = 2):
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = timeout
        self._pool = WorkerPool(workers)
        self._lock = threading.Lock()
        self._close = weakref.finalize(self, self._pool.close)  # runs at exit if never closed
        self.counts: Counter = Counter()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._close()

    @property
    def stats(self) -> dict:
        """Verdict counts so far, plus items sent to the pool, timeouts and worker crashes."""
        return {
            **{v: self.counts[v] for v in VERDICTS},
            "pooled": self.counts["pooled"],
            "worker_timeouts": self._pool.timeouts,
            "worker_crashes": self._pool.crashes,
        }

    def judge_many(
        self, items: list[tuple[str, str, str]], *, timeout: float | None = None
    ) -> list[tuple[str | None, str | None, str]]:
        """(extracted, rule, verdict) for (text, normalised gold, how) triples, in order; `how` is one of
        `ssb.verify.extract.HOWS`. Short texts are read here and only undecided answers go to the pool; long
        texts are read in a worker, so a verification of any input returns within `timeout`."""
        results: list[tuple[str | None, str | None, str] | None] = [None] * len(items)
        slow: dict[tuple[str, str, str], list[tuple[int, Extraction | None]]] = {}
        for i, (text, gold, how) in enumerate(items):
            if how not in HOWS:
                raise ValueError(f"item {i}: unknown answer reading {how!r} (expected one of {', '.join(HOWS)})")
            text = text or ""
            local = _inline(text, gold, how)
            if local is None:  # too long to read here: the worker extracts it under the deadline
                slow.setdefault((text, gold, how), []).append((i, None))
                continue
            found, pred, verdict = local
            if verdict is not None:
                results[i] = (found.answer, found.rule, verdict)
            else:  # identical pairs (K rollouts agreeing) are compared once
                slow.setdefault((pred, gold, "answer"), []).append((i, found))
        if slow:
            keys = list(slow)
            with self._lock:
                if not self._close.alive:
                    raise RuntimeError("Verifier is closed")
                replies = self._pool.run(keys, timeout or self.timeout)
            self.counts["pooled"] += len(keys)
            for key, (extracted, rule, verdict) in zip(keys, replies):
                for i, found in slow[key]:  # read here (found) or by the worker
                    results[i] = (extracted, rule, verdict) if found is None else (found.answer, found.rule, verdict)
        self.counts.update(r[2] for r in results)  # type: ignore[index]
        return results  # type: ignore[return-value]

    def equivalent_many(self, items: list[tuple[str, str]], *, timeout: float | None = None) -> list[str]:
        """Verdicts for (pred, gold) pairs of already-extracted answers, in order. Golds are
        normalised with `normalize_gold(gold, "auto")`; a bad gold raises ValueError naming its item."""
        golds = _normalized_golds(items)
        judged = self.judge_many([(pred or "", g, "answer") for (pred, _), g in zip(items, golds)], timeout=timeout)
        return [verdict for _, _, verdict in judged]

    def check_many(
        self,
        items: list[tuple[str, str]],
        policy: str | list[str] = "lenient",
        *,
        whole: bool = False,
        timeout: float | None = None,
    ) -> list[Verdict]:
        """Verdicts for (completion, gold) pairs, in order: extract with `policy` (one for all, or one per item),
        then compare. `whole`: a text that is a bare answer is taken whole (`extract_or_whole`, for `ssb verify`)."""
        policies = [policy] * len(items) if isinstance(policy, str) else list(policy)
        if len(policies) != len(items):
            raise ValueError(f"{len(policies)} policies for {len(items)} items")
        for p in set(policies):
            if p not in POLICIES:
                raise ValueError(f"unknown extraction policy {p!r} (expected one of {', '.join(POLICIES)})")
        golds = _normalized_golds(items)
        hows = [f"whole:{p}" if whole else p for p in policies]
        judged = self.judge_many([(text or "", g, h) for (text, _), g, h in zip(items, golds, hows)], timeout=timeout)
        return [Verdict(e, r, v, v == "correct", p) for (e, r, v), p in zip(judged, policies)]


def _normalized_golds(items: list[tuple[str, str]]) -> list[str]:
    golds = []
    for i, (_, gold) in enumerate(items):
        try:
            golds.append(normalize_gold(gold, "auto"))
        except ValueError as e:
            raise ValueError(f"item {i}: gold: {e}") from None
    return golds


_shared: Verifier | None = None
_shared_lock = threading.Lock()


def _shared_verifier() -> Verifier:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Verifier(workers=1)
        return _shared


def is_equivalent(pred: str, gold: str, timeout: float = 5.0) -> str:
    """Verdict for one extracted answer against one gold, in at most about `timeout` seconds."""
    gold_n = normalize_gold(gold, "auto")
    local = _inline(pred or "", gold_n, "answer")
    if local is not None and local[2] is not None:
        return local[2]
    return _shared_verifier().judge_many([(pred or "", gold_n, "answer")], timeout=timeout)[0][2]


def check(completion: str, gold: str, policy: str = "lenient", timeout: float = 5.0, *, whole: bool = False) -> Verdict:
    """Extracts the answer from `completion` with `policy` and compares it with `gold` (a bad gold is an error even
    when nothing is extracted). `whole`: a bare answer is taken whole, as `ssb verify PRED GOLD` does."""
    if policy not in POLICIES:
        raise ValueError(f"unknown extraction policy {policy!r} (expected one of {', '.join(POLICIES)})")
    gold_n = normalize_gold(gold, "auto")
    how = f"whole:{policy}" if whole else policy
    local = _inline(completion or "", gold_n, how)
    if local is not None and local[2] is not None:
        found, _, verdict = local
        extracted, rule = found.answer, found.rule
    else:
        extracted, rule, verdict = _shared_verifier().judge_many([(completion or "", gold_n, how)], timeout=timeout)[0]
    return Verdict(extracted, rule, verdict, verdict == "correct", policy)
