"""The report's content as a list of blocks (headings, paragraphs, tables, figures, examples), rendered by
`ssb.report.render` as HTML or markdown."""

from __future__ import annotations

from pathlib import Path

from ssb.compute import budget_lines
from ssb.report import plots
from ssb.report.read import NOT_RUN, STAGE_ORDER, funnel, stage_counts
from ssb.rundir import RunDir
from ssb.stages.target import funnel_line

# ---------------------------------------------------------------------------------------------- formatting


def _pct(x) -> str:
    return NOT_RUN if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    if x is None:
        return NOT_RUN
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _val(x) -> str:
    """A count of a stage that ran (a missing one is unknown, not 'not run')."""
    return "?" if x is None else _num(x)


def _secs(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def labels(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


# ---------------------------------------------------------------------------------------------- content

# A report is a list of blocks rendered twice (HTML and markdown):
# ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", file name, png bytes, alt) | ("example", dict)


def _funnel_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Curation funnel")]
    rows = []
    for r in runs:
        f, te, ro = funnel(r), stage_counts(r, "teach"), stage_counts(r, "rollout")
        rows.append(
            [
                r["label"],
                *[_num(v) for v in f.values()],
                _pct(ro.get("correct_share")),
                _pct(te.get("pass_rate_first_attempt")),
            ]
        )
    blocks.append(("table", ["run", *funnel(runs[0]).keys(), "rollouts correct", "teacher pass rate"], rows))
    png = plots.funnel_plot({r["label"]: funnel(r) for r in runs})
    blocks.append(("img", "funnel.png", png, "Curation funnel") if png else ("p", f"Curation: {NOT_RUN}."))
    for r in runs:  # the teach stage's yield funnel over all question batches (teach.target_pairs)
        te = stage_counts(r, "teach")
        if te.get("funnel"):
            blocks.append(("p", f"{r['label']}: yield {funnel_line(te).removeprefix('[teach] funnel: ')}."))
    return blocks


def _training_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Training dynamics")]
    ssb = {r["label"]: r["metrics"] for r in runs if r["metrics"]}
    png = plots.training_plot(ssb) if ssb else None
    blocks.append(
        ("img", "training.png", png, "SSB training dynamics")
        if png
        else ("p", f"SSB training: {NOT_RUN} (no metrics.jsonl).")
    )
    for r in runs:
        t = stage_counts(r, "train")
        if t:
            blocks.append(
                (
                    "p",
                    f"{r['label']}: {_val(t.get('steps'))} steps on {_val(t.get('pairs'))} pairs "
                    f"({_val(t.get('solution_tokens'))} solution tokens), final mean loss "
                    f"{_val(t.get('train_loss'))}, teacher {t.get('teacher', '?')}.",
                )
            )
    grpo = {r["label"]: r["grpo_metrics"] for r in runs if r["grpo_metrics"]}
    png = plots.grpo_plot(grpo) if grpo else None
    if png:
        blocks.append(("img", "grpo.png", png, "GRPO training dynamics"))
    for r in runs:
        g = stage_counts(r, "grpo")
        if g:
            blocks.append(
                (
                    "p",
                    f"{r['label']} GRPO baseline: {_val(g.get('steps'))} steps, "
                    f"{_val(g.get('completions'))} completions, mean reward {_val(g.get('reward_first'))} "
                    f"at the first logged step and {_val(g.get('reward_last'))} at the last.",
                )
            )
    return blocks


def _eval_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Evaluation")]
    rows, bars = [], []
    for r in runs:
        for e in r["evals"]:
            ci = f"{100 * e['pass1']:.1f}% [{100 * e['low']:.1f}–{100 * e['high']:.1f}]"
            rows.append(
                [
                    r["label"],
                    e["tag"],
                    e["benchmark"],
                    str(e["n"]),
                    str(e["problems"]),
                    ci,
                    _pct(e["maj"]),
                    f"{e['mean_tokens']:.0f}",
                    _pct(e["truncated"]),
                    _share(e["looping"]),
                    _share(e["wrong_step"]),
                    _share(e["right_wrong_step"]),
                ]
            )
            label = e["tag"] if len(runs) == 1 else f"{r['label']}/{e['tag']}"
            bars.append(
                {
                    "label": label,
                    "benchmark": e["benchmark"],
                    "pass1": e["pass1"],
                    "low": e["low"],
                    "high": e["high"],
                    "level": e["level"],
                }
            )
    if not rows:
        return blocks + [("p", f"Evaluation: {NOT_RUN} (no summary.json under eval/).")]
    level = runs[0]["evals"][0]["level"] if runs[0]["evals"] else 0.95
    blocks.append(
        (
            "table",
            [
                "run",
                "model",
                "benchmark",
                "n",
                "problems",
                f"pass@1 [{round(100 * level)}% CI]",
                "maj@n",
                "mean tokens",
                "truncated",
                "looping",
                "wrong step",
                "right answer, wrong step",
            ],
            rows,
        )
    )
    blocks.append(("img", "eval.png", plots.eval_plot(bars), "pass@1 with confidence intervals"))
    blocks.append(
        (
            "p",
            "Looping: cut at the token limit while the last lines repeat; wrong step: a written `a op b = c` that "
            "does not hold; right answer, wrong step: both at once (docs/quality.md). '-': a summary written "
            "before these were measured.",
        )
    )
    return blocks


def _share(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _length_blocks(runs: list[dict]) -> list:
    """Completion length per arm along training (first and last logged step) and at evaluation."""
    rows = []
    eval_tags = {"SSB": "ssb", "SFT": "sft", "GRPO": "grpo", "Dr. GRPO": "dr_grpo"}
    for r in runs:
        evals = {e["tag"]: e for e in r["evals"]}
        if "base" in evals:
            rows.append([r["label"], "base", "-", "-", f"{evals['base']['mean_tokens']:.0f}"])
        for arm, rows_ in r["arm_metrics"].items():
            lens = [m["completion_len"] for m in rows_ if m.get("completion_len") is not None]
            at_eval = evals.get(eval_tags[arm])
            if not lens and not at_eval:
                continue
            rows.append(
                [
                    r["label"],
                    arm,
                    f"{lens[0]:.0f}" if lens else "-",
                    f"{lens[-1]:.0f}" if lens else "-",
                    f"{at_eval['mean_tokens']:.0f}" if at_eval else "-",
                ]
            )
    if not rows:
        return []
    return [
        ("h2", "Completion length per arm"),
        ("table", ["run", "arm", "training: first step", "training: last step", "eval: mean tokens"], rows),
        (
            "p",
            "Training lengths are mean tokens per example at the first and last logged step: for SSB and SFT the "
            "teacher solutions trained on, for GRPO the completions it sampled. Eval: the trained model's own "
            "greedy answers on the held-out problems.",
        ),
    ]


def _tokens(r: dict, stage: str):
    c = stage_counts(r, stage)
    if stage in ("grpo", "dr_grpo"):
        return c.get("generated_tokens")
    return {"rollout": c.get("tokens"), "teach": r["teach_tokens"]}.get(stage)


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def _time_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Wall time, CPU time, generated tokens and peak memory per stage")]
    rows = []
    for r in runs:
        names = [s for s in STAGE_ORDER if s in r["stages"]] + sorted(set(r["stages"]) - set(STAGE_ORDER))
        for s in names:
            e, tok = r["stages"][s], _tokens(r, s)
            tok = "-" if tok is None else str(tok)
            rows.append(
                [r["label"], s, e.get("status", "?"), _secs(e.get("seconds")), _secs(e.get("cpu_seconds")), tok]
                + [_gib(e.get("peak_rss_bytes"))]
            )
        for e in r["evals"]:
            gen = round(e["mean_tokens"] * e["n"] * e["problems"])
            stage = f"eval {e['tag']}/{e['benchmark']}"
            rows.append([r["label"], stage, "done", _secs(e["seconds"]), "-", str(gen), _gib(e.get("peak_rss_bytes"))])
        if not names and not r["evals"]:
            rows.append([r["label"], "(no stage)", NOT_RUN, "-", "-", "-", "-"])
        for line in budget_lines(RunDir(r["root"]), r["epochs"]):
            blocks.append(("p", f"{r['label']}: {line.removeprefix('[compute] ')}"))
    header = ["run", "stage", "status", "wall time", "CPU time", "generated tokens", "peak memory (RSS)"]
    blocks.insert(1, ("table", header, rows))
    return blocks


def _example_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Example teacher solutions")]
    for r in runs:
        if not r["examples"]:
            blocks.append(("p", f"{r['label']}: teacher solutions {NOT_RUN} (no pairs.jsonl)."))
        for ex in r["examples"]:
            blocks.append(("example", {**ex, "run": r["label"] if len(runs) > 1 else None}))
    return blocks


def build_blocks(runs: list[dict]) -> list:
    return (
        _funnel_blocks(runs)
        + _training_blocks(runs)
        + _eval_blocks(runs)
        + _length_blocks(runs)
        + _time_blocks(runs)
        + _example_blocks(runs)
    )
