"""The run directory: every artifact's path, the manifest, and crash-safe file writes.

All stages read and write through `RunDir`, so the layout is defined here and nowhere else:

    RUN/config.yaml              resolved config of the last invocation
    RUN/manifest.json            per stage: status, times, counts, config and input hashes
    RUN/data/train.jsonl         the training questions, normalised (id, question, answer, source)
    RUN/rollouts.jsonl           one line per question: K rollouts with answers and verdicts
    RUN/curated.jsonl            questions kept for teaching, with the hinted teacher prompt
    RUN/pairs.jsonl              verified teacher solutions: teacher/student messages + solution token ids
    RUN/teach_attempts.jsonl     every teacher attempt, kept or not
    RUN/logits/                  sparse teacher distributions (sharded safetensors + index.json)
    RUN/train/                   trainer checkpoints and TensorBoard logs
    RUN/metrics.jsonl            training metrics, one line per logging step
    RUN/adapter/                 final LoRA adapter (PeftModel.from_pretrained) + ssb_base.json
    RUN/merged/                  merged model, when train.merge is set
    RUN/eval/<model>/<bench>/    samples.jsonl + summary.json per evaluated model and benchmark
    RUN/sft/                     SFT baseline: a run directory of its own (pairs.jsonl copy, adapter/, metrics)
    RUN/grpo/                    GRPO baseline: adapter/, metrics.jsonl, checkpoints/
    RUN/report/                  report.html + report.md
    RUN/round-N/                 later rounds of iterated SSB, each a run directory of its own

Writes are atomic (temp file + rename) and JSONL files are appended one flushed record at a time, so a
killed process never leaves a half-written file that a later run trusts: `read_jsonl` drops a torn last line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

MANIFEST_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------------------------------------- files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give ours the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class JsonlWriter:
    """Appends records one line at a time, flushed and fsynced, so each finished record survives a kill."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path, *, repair: bool = True) -> list[dict]:
    """Read our own JSONL artifact. A torn last line (killed mid-write) is dropped and, with `repair`,
    cut from the file so appends continue cleanly. A bad line elsewhere is corruption: an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
            good_bytes += len(line) + 1
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # last line without newline: a record cut off by a kill
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(min(good_bytes, len(raw)))
                break
            raise ValueError(f"{path}:{i + 1}: corrupted record (not valid JSON); delete the file or rerun "
                             f"the stage with --force") from None
    return records


def file_digest(path: str | Path) -> str:
    """Content hash of a file, or of a directory's files (names + contents), for the manifest."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                h.update(str(p.relative_to(path)).encode())
                h.update(file_digest(p).encode())
    elif path.exists():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(b"<missing>")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / "config.yaml")
    manifest_path = property(lambda self: self.root / "manifest.json")
    train_data = property(lambda self: self.root / "data" / "train.jsonl")
    rollouts = property(lambda self: self.root / "rollouts.jsonl")
    curated = property(lambda self: self.root / "curated.jsonl")
    pairs = property(lambda self: self.root / "pairs.jsonl")
    teach_attempts = property(lambda self: self.root / "teach_attempts.jsonl")
    logits_dir = property(lambda self: self.root / "logits")
    train_dir = property(lambda self: self.root / "train")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    adapter_dir = property(lambda self: self.root / "adapter")
    merged_dir = property(lambda self: self.root / "merged")
    report_dir = property(lambda self: self.root / "report")
    grpo_dir = property(lambda self: self.root / "grpo")

    def eval_dir(self, model_tag: str, benchmark: str) -> Path:
        return self.root / "eval" / model_tag / benchmark

    @property
    def sft_run(self) -> "RunDir":
        """The SFT baseline: a run directory of its own holding a copy of pairs.jsonl."""
        return RunDir(self.root / "sft")

    def round_dir(self, n: int) -> "RunDir":
        return RunDir(self.root / f"round-{n}")

    def mkdir(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------------- manifest

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{self.manifest_path}: corrupted manifest (not valid JSON)") from None

    def stage_entry(self, stage: str) -> dict | None:
        return self.read_manifest()["stages"].get(stage)

    def update_stage(self, stage: str, **fields: Any) -> None:
        manifest = self.read_manifest()
        manifest["stages"].setdefault(stage, {}).update(fields)
        atomic_write_json(self.manifest_path, manifest)


class StageSkipped(Exception):
    pass


@dataclass
class Stage:
    """What a running stage reports back: counts go into the manifest, `summary` is printed."""

    name: str
    counts: dict
    resumed: bool
    log: list[str]

    def say(self, line: str) -> None:
        self.log.append(line)
        print(line, flush=True)


@contextlib.contextmanager
def stage(run: RunDir, name: str, config_parts: tuple, inputs: list[Path], outputs: list[Path],
          force: bool = False) -> Iterator[Stage | None]:
    """Run a stage under the manifest's bookkeeping.

    Yields None when the stage already finished with the same config and inputs (the caller skips it).
    A stage interrupted earlier with the same config resumes (its function reads what exists). If the config or
    inputs changed since, the old outputs are moved aside to `<name>.stale-<time>` (nothing is deleted) and the
    stage starts over; `force` does the same for a finished stage.
    """
    from ssb.config import config_hash

    run.mkdir()
    chash = config_hash(*config_parts)
    ihash = hashlib.sha256("".join(file_digest(p) for p in inputs).encode()).hexdigest()[:16]
    entry = run.stage_entry(name) or {}
    same = entry.get("config_hash") == chash and entry.get("inputs_hash") == ihash
    if entry.get("status") == "done" and same and not force and all(p.exists() for p in outputs):
        print(f"[{name}] already done with the same config and inputs; skipping (--force reruns it)")
        yield None
        return
    resumed = bool(entry) and same and not force and entry.get("status") in ("running", "failed")
    if not resumed:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in outputs:
            if p.exists():
                p.rename(p.with_name(f"{p.name}.stale-{stamp}"))
    t0 = time.time()
    run.update_stage(name, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"), config_hash=chash,
                     inputs_hash=ihash, resumed=resumed)
    st = Stage(name=name, counts={}, resumed=resumed, log=[])
    try:
        yield st
    except BaseException as e:
        run.update_stage(name, status="failed", error=f"{type(e).__name__}: {e}"[:500],
                         seconds=round(time.time() - t0, 2), counts=st.counts)
        raise
    run.update_stage(name, status="done", ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     seconds=round(time.time() - t0, 2), counts=st.counts, error=None)
