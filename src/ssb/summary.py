"""Eval summaries: the statistics of one model on one benchmark from its finished problem records (pass@1 with
its interval, pass@k, maj@n, lengths, truncation, reasoning-quality shares), and the lines that report them.
Pure functions: no model, no files (see ssb.metrics for the formulas)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ssb.metrics import majority_vote, mean_ci, pass_at_k, wilson_ci
from ssb.verify.steps import step_stats


class EvalError(ValueError):
    """Bad eval input or outputs that do not match the request; the message says what to do."""


def build_summary(records: list[dict], settings: dict, level: float = 0.95) -> dict:
    """Summary statistics of finished problem records (each with `samples` carrying correct/extracted/verdict/
    num_tokens/finish_reason, and optionally session, t and backend). Pure: no model, no files.

    Keys: pass@1 and pass@1_ci {low, high, level, method}; pass@k {"1".."n"} (unbiased estimator, averaged over
    problems); maj@n (share of problems whose most common extracted answer, ties to the first seen, was judged
    correct); mean_tokens, truncated_share and truncated_correct_share (cut off at the token limit yet judged
    correct: an answer stated before the model ran on, often in a loop) over all samples; the reasoning-quality
    shares of `ssb.verify.steps.step_stats` (step_checked_share, wrong_step_share, correct_with_wrong_step_share,
    looping_share, steps_checked, steps_wrong; summaries written before they existed lack them); verdicts (sample
    counts); wall_seconds (generation + verification time, model loading excluded, summed over resumed sessions)
    and tokens_per_second.
    """
    if not records:
        raise EvalError("no finished problems to summarise")
    n = min(len(r["samples"]) for r in records)
    m = len(records)
    counts = [sum(bool(s["correct"]) for s in r["samples"]) for r in records]
    scores = [c / len(r["samples"]) for c, r in zip(counts, records)]
    p1 = sum(scores) / m
    if n == 1 or len(set(scores)) == 1:
        lo, hi = wilson_ci(sum(scores), m, level)
        method = "wilson (over problems)" if n == 1 else "wilson (all problems scored equally)"
    else:
        lo, hi = mean_ci(scores, level)
        method = "normal approximation over per-problem pass rates"
    maj = 0
    for r in records:
        voted = majority_vote([s["extracted"] for s in r["samples"]])
        maj += voted is not None and any(s["correct"] for s in r["samples"] if s["extracted"] == voted)
    samples = [s for r in records for s in r["samples"]]
    tokens = sum(s["num_tokens"] for s in samples)
    sessions: dict[int, float] = {}
    for r in records:
        if "t" in r:
            sessions[r.get("session", 0)] = max(sessions.get(r.get("session", 0), 0.0), r["t"])
    wall = sum(sessions.values())
    verdicts = Counter(s["verdict"] for s in samples)
    return {
        "model": settings.get("model"),
        "benchmark": settings.get("benchmark"),
        "n": n,
        "temperature": settings.get("temperature"),
        "policy": settings.get("policy"),
        "problems": m,
        "pass@1": p1,
        "pass@1_ci": {"low": lo, "high": hi, "level": level, "method": method},
        "pass@k": {
            str(k): sum(pass_at_k(len(r["samples"]), c, k) for r, c in zip(records, counts)) / m
            for k in range(1, n + 1)
        },
        "maj@n": maj / m,
        "mean_tokens": tokens / len(samples),
        "truncated_share": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
        "truncated_correct_share": sum(s["finish_reason"] == "length" and bool(s["correct"]) for s in samples)
        / len(samples),
        **step_stats(samples),
        "verdicts": {v: verdicts.get(v, 0) for v in ("correct", "incorrect", "unparsed", "timeout")},
        "wall_seconds": round(wall, 2),
        "sessions": len(sessions),
        "tokens_per_second": round(tokens / wall, 1) if wall > 0 else None,
        "backend": next((r["backend"] for r in reversed(records) if r.get("backend")), None),
    }


def pct(x: float) -> str:
    """A share as a percentage with one decimal: 0.1234 -> '12.3'."""
    return f"{100 * x:.1f}"


def result_line(s: dict) -> str:
    """`pass@1 = 12.5% [95% CI 8.1–17.0] on 200 arith problems`"""
    ci = s["pass@1_ci"]
    line = (
        f"pass@1 = {pct(s['pass@1'])}% [{round(100 * ci['level'])}% CI {pct(ci['low'])}–{pct(ci['high'])}] "
        f"on {s['problems']} {s['benchmark']} problems"
    )
    return line + (f" (n={s['n']}, T={s['temperature']}; maj@{s['n']} = {pct(s['maj@n'])}%)" if s["n"] > 1 else "")


def detail_line(s: dict, out: Path) -> str:
    v, tps = s["verdicts"], s["tokens_per_second"]
    speed = f" ({tps:.0f} tokens/s, {s['backend']})" if tps else ""
    quality = ""
    if "wrong_step_share" in s:  # summaries written before the step checker lack these
        quality = (
            f", {pct(s['looping_share'])}% looping; {pct(s['wrong_step_share'])}% with a wrong arithmetic step "
            f"({pct(s['correct_with_wrong_step_share'])}% right answer yet a wrong step)"
        )
    return (
        f"[eval] mean {s['mean_tokens']:.0f} tokens, {pct(s['truncated_share'])}% truncated "
        f"({pct(s['truncated_correct_share'])}% truncated yet correct){quality}, {v['unparsed']} unparsed, "
        f"{v['timeout']} verifier timeouts; {s['wall_seconds']:.0f} s generating{speed} -> {out}"
    )
