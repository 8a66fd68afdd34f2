"""`ssb compare`: one table of eval summaries, and paired tests between every two runs on the same problems.

Runs on identical problem sets get a paired bootstrap CI of the pass@1 difference (10,000 resamples of problems)
and, when both runs have n = 1, the exact McNemar p-value (else the bootstrap p-value).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssb.files import atomic_write_text, read_json_object
from ssb.metrics import mcnemar_exact, paired_bootstrap
from ssb.records import need, read_checked
from ssb.rundir import SAMPLES, SUMMARY
from ssb.summary import EvalError, pct


def _load_run(d: Path) -> tuple[dict, dict[str, float]]:
    path = Path(d) / SUMMARY
    if not path.exists():
        raise EvalError(f"{path}: not found (is {d} an eval output directory, and did the evaluation finish?)")
    summary = _read_json(path)
    for key in ("model", "benchmark"):
        need(summary, str(path), key, str, type(None))
    for key in ("n", "pass@1", "maj@n", "mean_tokens", "truncated_share"):
        need(summary, str(path), key, int, float)
    ci = need(summary, str(path), "pass@1_ci", dict)
    for key in ("low", "high"):
        need(ci, str(path), key, int, float, label=f"pass@1_ci.{key}")
    scores = {}
    for r in read_checked(Path(d) / SAMPLES, _check_sample, repair=False):
        scores[r["id"]] = r["correct"] / len(r["samples"])
    return summary, scores


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _check_sample(rec: dict, where: str) -> None:
    need(rec, where, "id", str, nonempty=True)
    need(rec, where, "correct", int)
    need(rec, where, "samples", list, nonempty=True)


def compare(dirs: list[Path], *, iters: int = 10000, seed: int = 0) -> str:
    """Markdown: one row per eval output directory, then a paired test for every two runs on the same problems."""
    runs = [_load_run(Path(d)) for d in dirs]
    lines = [
        "| # | run | model | benchmark | n | pass@1 [95% CI] | maj@n | mean tokens | truncated | looping "
        "| wrong step | right answer, wrong step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, (d, (s, _)) in enumerate(zip(dirs, runs), 1):
        ci = s["pass@1_ci"]
        lines.append(
            f"| {i} | {d} | {s['model']} | {s['benchmark']} | {s['n']} | {pct(s['pass@1'])}% "
            f"[{pct(ci['low'])}–{pct(ci['high'])}] | {pct(s['maj@n'])}% | {s['mean_tokens']:.0f} | "
            f"{pct(s['truncated_share'])}% | "
            + " | ".join(  # docs/quality.md; '-' in summaries written before the step checker
                f"{pct(s[k])}%" if k in s else "-"
                for k in ("looping_share", "wrong_step_share", "correct_with_wrong_step_share")
            )
            + " |"
        )
    if len(runs) < 2:
        return "\n".join(lines)
    paired = [
        "",
        f"Paired differences of pass@1 (A − B) over the same problems: 95% CI from a paired bootstrap "
        f"({iters} resamples of problems, seed {seed}); p is exact McNemar when both runs have n = 1, "
        f"else the bootstrap p-value.",
        "",
        "| A | B | problems | Δ pass@1 | 95% CI | p | test |",
        "|---|---|---|---|---|---|---|",
    ]
    unpaired: list[str] = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            (sa, a), (sb, b) = runs[i], runs[j]
            if set(a) != set(b):
                unpaired.append(
                    f"- {i + 1} vs {j + 1}: not paired (different problem sets: {len(a)} and {len(b)} "
                    f"problems, {len(set(a) & set(b))} shared)"
                )
                continue
            ids = sorted(a)
            boot = paired_bootstrap([a[k] for k in ids], [b[k] for k in ids], iters=iters, seed=seed)
            if sa["n"] == 1 and sb["n"] == 1:
                p = mcnemar_exact(sum(a[k] > b[k] for k in ids), sum(a[k] < b[k] for k in ids))
                test = "McNemar exact"
            else:
                p, test = boot["p"], "bootstrap"
            paired.append(
                f"| {i + 1} | {j + 1} | {len(ids)} | {100 * boot['diff']:+.1f} pts | "
                f"[{100 * boot['low']:+.1f}, {100 * boot['high']:+.1f}] | {p:.3g} | {test} |"
            )
    if len(paired) > 5:  # at least one pair of runs on the same problems
        lines += paired
    return "\n".join(lines + ([""] + unpaired if unpaired else []))


# which experiment config measures each comparison over seeds (the follow-up named in `findings`)
FOLLOW_UP = {
    "ssb": "configs/experiments/negative-context.yaml",
    "sft": "configs/experiments/hard-vs-soft.yaml",
    "grpo": "configs/experiments/baselines.yaml",  # GRPO at SSB's compute
    "dr_grpo": "configs/experiments/baselines.yaml",
}
LABELS = {"ssb": "SSB", "sft": "SFT", "grpo": "GRPO", "dr_grpo": "Dr. GRPO"}


def _scores_and_clusters(d: Path) -> tuple[dict[str, float], dict[str, str]]:
    records = read_checked(Path(d) / SAMPLES, _check_sample, repair=False)
    scores = {r["id"]: r["correct"] / len(r["samples"]) for r in records}
    return scores, {r["id"]: r.get("cluster") or r["id"] for r in records}


def findings(runs: dict[str, Path], *, reference: str = "base", iters: int = 10000, seed: int = 0) -> list[str]:
    """One plain sentence per model vs the reference (`runs`: tag -> eval output directory, one seed each):
    the pass@1 difference with a 95% paired bootstrap interval over problems (resampled by calculation for the
    built-in arithmetic, whose problems repeat calculations), whether it resolves a difference, and which
    `ssb experiment` config measures it over seeds."""
    from ssb.metrics import Scores, difference_sentence, paired_crossed_bootstrap

    ref_scores, ref_clusters = _scores_and_clusters(runs[reference])
    ref = Scores({0: ref_scores}, ref_clusters)
    lines = []
    for tag, d in runs.items():
        if tag == reference:
            continue
        scores, clusters = _scores_and_clusters(d)
        if set(scores) != set(ref_scores):
            continue
        result = paired_crossed_bootstrap(Scores({0: scores}, clusters), ref, iters=iters, seed=seed)
        kind = "ssb" if tag.startswith("ssb") else tag
        config = FOLLOW_UP.get(kind)
        label = LABELS.get(tag, tag.replace("ssb-round", "SSB round "))
        follow = (
            f"`ssb experiment {config}` measures it with 3 seeds"
            if config
            else f"`ssb experiment` with a base arm and a {kind} arm measures it over seeds (docs/experiments.md)"
        )
        if result["low"] > 0 or result["high"] < 0:
            follow = f"one seed only; {follow}"
        clustered = any(clusters[i] != i for i in clusters)
        lines.append(difference_sentence(label, reference, result, clustered=clustered, follow_up=follow))
    return lines


def compare_main(argv: list[str]) -> int:
    """`ssb compare DIR [DIR ...] [--iters N] [--seed S] [--output FILE.md]`: print the comparison table."""
    p = argparse.ArgumentParser(prog="ssb compare", description="Table of eval summaries with paired tests")
    p.add_argument("dirs", nargs="+", help="eval output directories (each with summary.json + samples.jsonl)")
    p.add_argument("--iters", type=int, default=10000, help="paired bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--output", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    try:
        table = compare([Path(d) for d in args.dirs], iters=args.iters, seed=args.seed)
    except (EvalError, ValueError, OSError) as e:
        print(f"ssb compare: error: {e}", file=sys.stderr)
        return 2
    print(table)
    if args.output:
        try:
            atomic_write_text(args.output, table + "\n")
        except OSError as e:
            print(f"ssb compare: error: cannot write {args.output}: {e}", file=sys.stderr)
            return 2
    return 0
