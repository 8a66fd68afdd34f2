"""`ssb report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page (figures embedded as base64 PNG) and a
markdown twin (report.md with the PNGs beside it) summarising one or more run directories.

Sections: the curation funnel (manifest counts of the rollout, curate and teach stages), training dynamics
(RUN/metrics.jsonl, and RUN/grpo/metrics.jsonl for the GRPO baseline), every eval summary under RUN/eval/ with
its confidence interval, wall time and generated tokens per stage, and three teacher solutions beside their
questions. Whatever a run has not produced yet is shown as "not run". The report only reads the run directories.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
import time
from pathlib import Path

from ssb import plots
from ssb.files import atomic_write_text, decode_utf8
from ssb.records import check_id_only, check_metrics, need, read_checked
from ssb.rundir import RunDir

NOT_RUN = "not run"
STAGE_ORDER = ("rollout", "curate", "teach", "logits", "train", "grpo")
N_EXAMPLES = 3


# ---------------------------------------------------------------------------------------------- reading


def _jsonl(path: Path, check=check_id_only) -> list[dict]:
    return read_checked(path, check, repair=False)  # a report never modifies a run


def _need(d: dict, key: str, path: Path):
    if key not in d:
        raise ValueError(f"{path}: missing field '{key}'")
    return d[key]


def _check_pair(rec: dict, where: str) -> None:
    check_id_only(rec, where)
    need(rec, where, "question", str)
    need(rec, where, "solution", str)


def _check_attempt_tokens(rec: dict, where: str) -> None:
    need(rec, where, "num_tokens", int)


def read_evals(root: Path) -> list[dict]:
    """One row per RUN/eval/<model tag>/<benchmark>/summary.json."""
    rows = []
    for path in sorted((root / "eval").glob("**/summary.json")):
        try:
            s = json.loads(decode_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(s, dict):
            raise ValueError(f"{path}: expected a JSON object")
        rel = path.parent.relative_to(root / "eval").parts
        where = str(path)
        ci = need(s, where, "pass@1_ci", dict)
        rows.append(
            {
                "tag": rel[0] if len(rel) > 1 else "-",
                "benchmark": s.get("benchmark") or rel[-1],
                "n": need(s, where, "n", int),
                "problems": need(s, where, "problems", int),
                "pass1": need(s, where, "pass@1", float),
                "low": need(ci, where, "low", float, label="pass@1_ci.low"),
                "high": need(ci, where, "high", float, label="pass@1_ci.high"),
                "level": ci.get("level", 0.95) if isinstance(ci.get("level", 0.95), (int, float)) else 0.95,
                "maj": need(s, where, "maj@n", float),
                "mean_tokens": need(s, where, "mean_tokens", float),
                "truncated": need(s, where, "truncated_share", float),
                "seconds": need(s, where, "wall_seconds", float, type(None)) if "wall_seconds" in s else None,
                "model": s.get("model"),
            }
        )
    return rows


def read_examples(run: RunDir, k: int = N_EXAMPLES) -> list[dict]:
    """The first k teacher pairs, with the wrong answer the hint showed (from curated.jsonl) when there was one."""
    pairs = _jsonl(run.pairs, _check_pair)[:k]
    curated = {c["id"]: c for c in _jsonl(run.curated)} if pairs else {}
    out = []
    for p in pairs:
        c = curated.get(p["id"], {})
        out.append(
            {
                "id": p["id"],
                "question": _need(p, "question", run.pairs),
                "gold": p.get("gold"),
                "solution": _need(p, "solution", run.pairs),
                "extracted": p.get("extracted"),
                "wrong_answer": c.get("wrong_answer"),
                "wrong": c.get("wrong"),
                "wrong_count": c.get("wrong_answer_count"),
                "correct_answer": c.get("correct_answer"),
            }
        )
    return out


# the counts the report computes with (other counts are not read)
_NUMERIC_COUNTS = (
    "questions", "all_correct", "all_wrong", "unparsed", "mixed", "pairs", "correct_share", "pass_rate_first_attempt",
    "steps", "solution_tokens", "train_loss", "completions", "reward_first", "reward_last", "tokens",
    "generated_tokens",
)  # fmt: skip


def _check_stages(stages: dict, path: Path) -> dict:
    """Stage entries as the report uses them: numbers where it computes, text where it prints."""
    for name, entry in stages.items():
        for key in ("seconds",):
            if entry.get(key) is not None:
                need(entry, str(path), key, float, label=f"stages.{name}.{key}")
        counts = entry.get("counts") or {}
        if not isinstance(counts, dict):
            raise ValueError(f"{path}: field 'stages.{name}.counts': expected an object")
        for key in _NUMERIC_COUNTS:
            if counts.get(key) is not None:
                need(counts, str(path), key, float, label=f"stages.{name}.counts.{key}")
    return stages


def read_run(root: Path, label: str) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    run = RunDir(root)
    stages = _check_stages(run.read_manifest().get("stages", {}), run.manifest_path)
    teach_tokens = (
        sum(a["num_tokens"] for a in _jsonl(run.teach_attempts, _check_attempt_tokens)) if "teach" in stages else None
    )
    return {
        "label": label,
        "root": root,
        "stages": stages,
        "metrics": _jsonl(run.metrics, check_metrics),
        "grpo_metrics": _jsonl(RunDir(root).grpo_dir / "metrics.jsonl", check_metrics),
        "evals": read_evals(root),
        "examples": read_examples(run),
        "teach_tokens": teach_tokens,
    }


def _counts(r: dict, stage: str) -> dict:
    return (r["stages"].get(stage) or {}).get("counts") or {}


def funnel(r: dict) -> dict[str, int | None]:
    """Bar name -> count (None where the stage has not run), in funnel order."""
    ro, cu, te = _counts(r, "rollout"), _counts(r, "curate"), _counts(r, "teach")
    return {
        "questions": ro.get("questions", cu.get("questions")),
        "all correct": cu.get("all_correct"),
        "all wrong": cu.get("all_wrong"),
        "unparsed": cu.get("unparsed"),
        "mixed (kept)": cu.get("mixed"),
        "verified pairs": te.get("pairs"),
    }


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


def _labels(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


# ---------------------------------------------------------------------------------------------- content

# A report is a list of blocks rendered twice (HTML and markdown):
# ("h2", text) | ("p", text) | ("table", headers, rows) | ("img", file name, png bytes, alt) | ("example", dict)


def _funnel_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Curation funnel")]
    rows = []
    for r in runs:
        f, te, ro = funnel(r), _counts(r, "teach"), _counts(r, "rollout")
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
        t = _counts(r, "train")
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
        g = _counts(r, "grpo")
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
            ],
            rows,
        )
    )
    blocks.append(("img", "eval.png", plots.eval_plot(bars), "pass@1 with confidence intervals"))
    return blocks


def _tokens(r: dict, stage: str):
    c = _counts(r, stage)
    return {"rollout": c.get("tokens"), "teach": r["teach_tokens"], "grpo": c.get("generated_tokens")}.get(stage)


def _time_blocks(runs: list[dict]) -> list:
    blocks: list = [("h2", "Wall time and generated tokens per stage")]
    rows = []
    for r in runs:
        names = [s for s in STAGE_ORDER if s in r["stages"]] + sorted(set(r["stages"]) - set(STAGE_ORDER))
        for s in names:
            e, tok = r["stages"][s], _tokens(r, s)
            tok = "-" if tok is None else str(tok)
            rows.append([r["label"], s, e.get("status", "?"), _secs(e.get("seconds")), tok])
        for e in r["evals"]:
            gen = round(e["mean_tokens"] * e["n"] * e["problems"])
            rows.append([r["label"], f"eval {e['tag']}/{e['benchmark']}", "done", _secs(e["seconds"]), str(gen)])
        if not names and not r["evals"]:
            rows.append([r["label"], "(no stage)", NOT_RUN, "-", "-"])
        ssb = [s for s in STAGE_ORDER[:5] if s in r["stages"]]
        if ssb and "grpo" in r["stages"]:
            sec = sum(r["stages"][s].get("seconds") or 0 for s in ssb)
            tok = sum(_tokens(r, s) or 0 for s in ("rollout", "teach"))
            g = r["stages"]["grpo"]
            blocks.append(
                (
                    "p",
                    f"{r['label']}: SSB stages ({', '.join(ssb)}) took {_secs(sec)} and generated "
                    f"{tok} tokens; GRPO took {_secs(g.get('seconds'))} and generated "
                    f"{_num(_tokens(r, 'grpo'))} tokens.",
                )
            )
    blocks.insert(1, ("table", ["run", "stage", "status", "wall time", "generated tokens"], rows))
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
        _funnel_blocks(runs) + _training_blocks(runs) + _eval_blocks(runs) + _time_blocks(runs) + _example_blocks(runs)
    )


# ---------------------------------------------------------------------------------------------- rendering

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.ex{display:grid;grid-template-columns:1fr 1.4fr;gap:1em;border:1px solid #ddd;padding:0.8em;margin:1em 0}
pre{white-space:pre-wrap;background:#f8f8f8;padding:0.6em;margin:0.3em 0;font-size:13px}.muted{color:#666}"""


def _html_example(ex: dict) -> str:
    e = html.escape
    hint = (
        (
            f"<p><b>Wrong answer shown in the hint:</b> {e(str(ex['wrong_answer']))}"
            + (f" <span class='muted'>({ex['wrong_count']} rollouts gave it)</span>" if ex.get("wrong_count") else "")
            + "</p>"
            + (
                f"<details><summary>wrong rollout</summary><pre>{e(ex['wrong'])}</pre></details>"
                if ex.get("wrong")
                else ""
            )
        )
        if ex.get("wrong_answer")
        else "<p class='muted'>No wrong answer in the hint.</p>"
    )
    run = f" <span class='muted'>({e(ex['run'])})</span>" if ex.get("run") else ""
    return (
        f"<div class='ex'><div><p><b>Question</b> <code>{e(str(ex['id']))}</code>{run}</p>"
        f"<pre>{e(ex['question'])}</pre><p><b>Gold answer:</b> {e(str(ex['gold']))}</p>{hint}</div>"
        f"<div><p><b>Teacher solution</b> <span class='muted'>(answer {e(str(ex['extracted']))})</span></p>"
        f"<pre>{e(ex['solution'])}</pre></div></div>"
    )


def render_html(blocks: list, title: str, subtitle: str) -> str:
    e = html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{e(title)}</h1><p class='muted'>{e(subtitle)}</p>"
    ]
    for b in blocks:
        if b[0] in ("h2", "p"):
            out.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[2]).decode("ascii")
            out.append(f"<img alt='{e(b[3])}' src='data:image/png;base64,{data}'>")
        elif b[0] == "example":
            out.append(_html_example(b[1]))
    return "\n".join(out + ["</body></html>\n"])


def _md_text(s) -> str:
    """Inline markdown text: no raw HTML from model output (renderers would interpret it)."""
    return html.escape(str(s), quote=False)


def _md_cell(s: str) -> str:
    return _md_text(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return f"{f}text\n{text}\n{f}"


def _md_example(ex: dict) -> str:
    run = f" ({ex['run']})" if ex.get("run") else ""
    t = _md_text
    lines = [f"**Question** `{ex['id']}`{t(run)}", "", _fence(ex["question"]), "", f"Gold answer: {t(ex['gold'])}", ""]
    if ex.get("wrong_answer"):
        seen = f" ({ex['wrong_count']} rollouts gave it)" if ex.get("wrong_count") else ""
        lines += [f"Wrong answer shown in the hint: {t(ex['wrong_answer'])}{seen}", ""]
    lines += [f"**Teacher solution** (answer {t(ex['extracted'])})", "", _fence(ex["solution"]), ""]
    return "\n".join(lines)


def render_markdown(blocks: list, title: str, subtitle: str) -> str:
    out = [f"# {title}", "", f"_{subtitle}_", ""]
    for b in blocks:
        if b[0] == "h2":
            out += [f"## {b[1]}", ""]
        elif b[0] == "p":
            out += [_md_text(b[1]), ""]
        elif b[0] == "table":
            out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
        elif b[0] == "img":
            out += [f"![{b[3]}]({b[1]})", ""]
        elif b[0] == "example":
            out += [_md_example(b[1])]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- entry point


def report(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Write report.html (self-contained), report.md and the PNG figures to `output` (default: the first run's
    report/ directory). Returns the path of report.html."""
    if not run_dirs:
        raise ValueError("ssb report needs at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    runs = [read_run(d, label) for d, label in zip(run_dirs, _labels(run_dirs))]
    out = Path(output) if output is not None else RunDir(run_dirs[0]).report_dir
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(runs)
    for b in blocks:
        if b[0] == "img":
            (out / b[1]).write_bytes(b[2])
    title = "SSB report: " + ", ".join(r["label"] for r in runs)
    subtitle = f"Generated {time.strftime('%Y-%m-%d %H:%M')} from " + ", ".join(str(d) for d in run_dirs)
    atomic_write_text(out / "report.md", render_markdown(blocks, title, subtitle))
    page = out / "report.html"
    atomic_write_text(page, render_html(blocks, title, subtitle))
    print(f"[report] {page} (+ report.md and {sum(b[0] == 'img' for b in blocks)} figures)", flush=True)
    return page


def report_main(argv: list[str]) -> int:
    """`ssb report RUN [RUN ...] [--output DIR]`."""
    p = argparse.ArgumentParser(prog="ssb report", description="HTML + markdown report of one or more runs")
    p.add_argument("run_dirs", nargs="+", help="run directories")
    p.add_argument("--output", help="output directory (default: the first run's report/)")
    args = p.parse_args(argv)
    try:
        report([Path(d) for d in args.run_dirs], output=Path(args.output) if args.output else None)
    except (OSError, ValueError) as e:
        print(f"ssb report: error: {e}", file=sys.stderr)
        return 2
    return 0
