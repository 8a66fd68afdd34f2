"""`ssb report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page (figures embedded as base64 PNG) and a
markdown twin (report.md with the PNGs beside it) summarising one or more run directories.

Sections: the curation funnel (manifest counts of the rollout, curate and teach stages), training dynamics
(RUN/metrics.jsonl, and RUN/grpo/metrics.jsonl for the GRPO baseline), every eval summary under RUN/eval/ with
its confidence interval and reasoning-quality shares, completion length per arm (training and eval), wall time and
generated tokens per stage with the compute budgets of SSB and the RL baselines (ssb.compute), and three teacher
solutions beside their questions. Whatever a run has not produced yet is shown as "not run". The report only
reads the run directories.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ssb.files import atomic_write_text
from ssb.report.content import build_blocks, labels
from ssb.report.read import read_run
from ssb.report.render import render_html, render_markdown
from ssb.rundir import RunDir


def report(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Write report.html (self-contained), report.md and the PNG figures to `output` (default: the first run's
    report/ directory). Returns the path of report.html."""
    if not run_dirs:
        raise ValueError("ssb report needs at least one run directory")
    run_dirs = [Path(d) for d in run_dirs]
    runs = [read_run(d, label) for d, label in zip(run_dirs, labels(run_dirs))]
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
