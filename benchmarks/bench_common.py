"""What the benchmark scripts share: turning a model spec into a directory, finding benchmark data, and writing a
result file."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))


def model_dir(spec: str) -> str:
    """'tiny' (a tiny random model built in a temporary directory), the embedded alias, a Hub id or a directory
    -> a local model directory."""
    if spec == "tiny":
        from ssb.testing import make_tiny_model

        return str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    from ssb.models import resolve

    return str(resolve(spec))


def data_file(name: str) -> Path | None:
    """A local benchmark file such as 'gsm8k_test.jsonl': in $SSB_DATA_DIR, else in ../shared/data beside the
    repository; None when neither has it."""
    for folder in filter(None, [os.environ.get("SSB_DATA_DIR"), ROOT.parent / "shared" / "data"]):
        path = Path(folder) / name
        if path.exists():
            return path
    return None


def save_result(name: str, result: dict) -> Path:
    """Write benchmarks/results/<name>.json (git-ignored) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
