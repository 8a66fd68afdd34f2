"""Benchmark: peak resident memory (RSS) of a whole `ssb run`, per stage and overall, against the 3 GiB target.

Runs `python -m ssb run <args>` in a subprocess (so the peak is that run's alone) in a fresh run directory.
Per stage: the manifest's `peak_rss_bytes` (ssb.memory.PeakRSS: a sampler thread plus ru_maxrss when it rose
during the stage, so per-stage peaks mean something although `ssb run` runs the stages in one process) and each
evaluation's summary.json `peak_rss_bytes`. Overall: the child's ru_maxrss (getrusage RUSAGE_CHILDREN after it
exits; the largest resident set of the run process or of any of its verifier workers).

Usage: benchmarks/memory.py [--run-dir DIR] [--target-gib 3] [--verb run] -- [ssb arguments, default: --preset quick]
e.g. benchmarks/memory.py -- --preset quick --set data.train.limit=16 --set eval.data.limit=16
Prints one final JSON line and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import save_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default=None, help="run directory (default: a fresh temporary one)")
    ap.add_argument("--target-gib", type=float, default=3.0)
    ap.add_argument("--verb", default="run", help="the ssb verb to measure (default: run, the whole pipeline)")
    ap.add_argument("ssb_args", nargs="*", help="arguments for `ssb run` (after --)")
    args = ap.parse_args()
    ssb_args = args.ssb_args or ["--preset", "quick"]
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="ssb-memory-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "ssb", args.verb, *ssb_args, "--run-dir", str(run_dir)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    finally:  # killed or interrupted: do not leave the run behind
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
    seconds = time.time() - t0
    overall = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    stages = {}
    manifest = run_dir / "manifest.json"
    if manifest.exists():
        for name, entry in json.loads(manifest.read_text())["stages"].items():
            stages[name] = entry.get("peak_rss_bytes")
    for summary in sorted(run_dir.glob("eval/*/*/summary.json")):
        rel = summary.parent.relative_to(run_dir / "eval")
        stages[f"eval {rel}"] = json.loads(summary.read_text()).get("peak_rss_bytes")
    target = int(args.target_gib * 2**30)
    result = {
        "peak_rss_bytes": overall,
        "peak_rss_gib": round(overall / 2**30, 3),
        "target_bytes": target,
        "under_target": overall < target,
        "stages_peak_rss_gib": {k: (None if v is None else round(v / 2**30, 3)) for k, v in stages.items()},
        "stages_peak_rss_bytes": stages,
        "exit_code": rc,
        "seconds": round(seconds, 1),
        "command": " ".join(cmd),
    }
    save_result("memory", result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
