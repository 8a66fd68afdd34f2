"""Answer extraction and verification: every correct/incorrect number SSB reports comes from here.

A completion is reduced to one answer string by an extraction policy (`ssb.verify.extract`), the
gold answer is normalised per source, and the two are compared:
  1. fast path, in process: when both sides are plain numbers (`2,125`, `025`, `27.0`, `3/4`,
     `\\frac{1}{2}`) they are compared exactly as fractions; most GSM8K / AIME / AMC answers end here.
  2. otherwise math-verify plus our guards (`ssb.verify.equiv.compare`) in a small pool of worker
     processes (`ssb.verify.worker`), each item with its own deadline; an item that overruns gets the verdict "timeout"
     and its worker is replaced, so one pathological answer costs at most `timeout` seconds.
Verdicts: "correct", "incorrect", "unparsed" (no answer could be extracted, or it did not parse and
did not match the gold as text) and "timeout".
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import Counter
from dataclasses import asdict, dataclass

from ssb.verify.extract import (
    GOLD_FORMATS,
    POLICIES,
    Extraction,
    as_fraction,
    clean_answer,
    extract_answer,
    normalize_gold,
)
from ssb.verify.worker import WorkerPool

__all__ = [
    "Extraction",
    "Verdict",
    "Verifier",
    "check",
    "extract_answer",
    "is_equivalent",
    "normalize_gold",
    "POLICIES",
    "GOLD_FORMATS",
    "VERDICTS",
]

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


_SAME_TEXT = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\(?:left|right)(?=[()\[\]|.]|\\[{}])"), ""),
    (re.compile(r"\s*([-+=,;()\[\]{}^_/])\s*"), r"\1"),
]


def _same_text(s: str) -> str:
    for pattern, repl in _SAME_TEXT:
        s = pattern.sub(repl, s)
    return s.strip()


def _fast_verdict(pred: str, gold: str) -> str | None:
    """Exact verdict when both answers are plain numbers or simple fractions, or are the same text
    up to spacing / `\\dfrac` / `\\left(`; None otherwise (the worker pool decides)."""
    if pred == gold or _same_text(pred) == _same_text(gold):
        return "correct"
    p = as_fraction(pred)
    if p is None:
        return None
    g = as_fraction(gold)
    if g is None:
        return None
    return "correct" if p == g else "incorrect"


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

    def equivalent_many(self, items: list[tuple[str, str]], *, timeout: float | None = None) -> list[str]:
        """Verdicts for (pred, gold) pairs of already-extracted answers, in order. Golds are
        normalised with `normalize_gold(gold, "auto")`; a bad gold raises ValueError naming its item."""
        results: list[str | None] = [None] * len(items)
        slow: dict[tuple[str, str], list[int]] = {}
        for i, (pred, gold) in enumerate(items):
            try:
                gold = normalize_gold(gold, "auto")
            except ValueError as e:
                raise ValueError(f"item {i}: gold: {e}") from None
            pred = clean_answer(pred or "")
            fast = _fast_verdict(pred, gold) if pred else "unparsed"
            if fast is not None:
                results[i] = fast
            else:  # identical pairs (K rollouts agreeing) are compared once
                slow.setdefault((pred, gold), []).append(i)
        if slow:
            keys = list(slow)
            with self._lock:
                if not self._close.alive:
                    raise RuntimeError("Verifier is closed")
                verdicts = self._pool.run(keys, timeout or self.timeout)
            self.counts["pooled"] += len(keys)
            for key, verdict in zip(keys, verdicts):
                for i in slow[key]:
                    results[i] = verdict
        self.counts.update(results)
        return results  # type: ignore[return-value]

    def check_many(self, items: list[tuple[str, str]], policy: str = "lenient") -> list[Verdict]:
        """Verdicts for (completion, gold) pairs, in order: extract with `policy`, then compare."""
        found = [extract_answer(completion, policy) for completion, _ in items]
        verdicts = self.equivalent_many([(f.answer or "", gold) for f, (_, gold) in zip(found, items)])
        return [Verdict(f.answer, f.rule, v, v == "correct", policy) for f, v in zip(found, verdicts)]


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
    gold_n, pred_c = normalize_gold(gold, "auto"), clean_answer(pred or "")
    fast = _fast_verdict(pred_c, gold_n) if pred_c else "unparsed"
    if fast is not None:
        return fast
    return _shared_verifier().equivalent_many([(pred_c, gold_n)], timeout=timeout)[0]


def check(completion: str, gold: str, policy: str = "lenient", timeout: float = 5.0) -> Verdict:
    """Extracts the answer from `completion` with `policy` and compares it with `gold`."""
    found = extract_answer(completion, policy)
    normalize_gold(gold, "auto")  # a bad gold is an error even when nothing was extracted
    verdict = is_equivalent(found.answer, gold, timeout) if found.answer else "unparsed"
    return Verdict(found.answer, found.rule, verdict, verdict == "correct", policy)
