"""The run directory: every artifact's path and the manifest. A stage's life in it (skip, resume or restart, locks,
manifest entries, sharing between run directories) is `ssb.lifecycle`.

All stages read and write through `RunDir`, so the layout is defined here and nowhere else:

    RUN/config.yaml              resolved config of the last invocation
    RUN/manifest.json            per stage: status, times, counts, config and input hashes, peak RSS
    RUN/data/train.jsonl         the training questions, normalised (id, question, answer, source)
    RUN/rollouts.jsonl           one line per question: K rollouts with answers and verdicts
    RUN/curated.jsonl            questions kept for teaching, with the hinted teacher prompt
    RUN/pairs.jsonl              verified teacher solutions: teacher/student messages + solution token ids
    RUN/teach_attempts.jsonl     every teacher attempt, kept or not
    RUN/batches/batch-N/         with teach.target_pairs: further question batches (rollouts, curated, pairs,
                                 teach_attempts, manifest), each a run directory of its own; their pairs are
                                 appended to RUN/pairs.jsonl up to the target
    RUN/logits/                  sparse teacher distributions (sharded safetensors + index.json)
    RUN/train/                   trainer checkpoints and TensorBoard logs
    RUN/metrics.jsonl            training metrics, one line per logging step
    RUN/adapter/                 final LoRA adapter (PeftModel.from_pretrained) + ssb_base.json
    RUN/merged/                  merged model, when train.merge is set
    RUN/eval/<model>/<bench>/    samples.jsonl + summary.json + eval_config.json per model and benchmark
    RUN/sft/                     SFT baseline: a run directory of its own (pairs.jsonl copy, adapter/, metrics)
    RUN/grpo/                    GRPO baseline: adapter/, metrics.jsonl, checkpoints/ (`RunDir.grpo_*`)
    RUN/dr_grpo/                 Dr. GRPO baseline (baselines: [..., dr_grpo]): the same layout (`RunDir.rl_*`)
    RUN/report/                  report.html + report.md
    RUN/round-N/                 later rounds of iterated SSB, each a run directory of its own

Under several processes (`ssb.parallel`) a generation stage's ranks append to RUN/<file>.rank-R-of-N.jsonl
(`rank_shard`) and the teacher-logits ranks write RUN/logits/rank-R-of-N/ (`rank_store`); rank 0 merges them
into the files above (`ssb.shards`), and only rank 0 writes the manifest.

Files are written through `ssb.files` (atomic writes, appended JSONL), so a killed stage never leaves a
half-written file that a later run trusts.

"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssb.files import atomic_write_json, decode_utf8

MANIFEST_VERSION = 1
# the files inside one eval output directory (RunDir.eval_dir, or any --output-dir)
SAMPLES, SUMMARY, EVAL_CONFIG = "samples.jsonl", "summary.json", "eval_config.json"


# ---------------------------------------------------------------------------------------------- layout

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_name(text: str, fallback: str) -> str:
    """One directory-name component made from `text`: other characters become '-', and never '', '.' or '..'
    (`fallback` then), so a name from a config value can never point outside its parent."""
    return _UNSAFE_NAME.sub("-", text).strip("-.") or fallback


def benchmark_tag(source: str) -> str:
    """A directory-safe name for an eval data source: 'arith', 'gsm8k', a file's stem, a Hub id's last part.
    `ssb run` and `ssb eval --run-dir` both name RUN/eval/<model>/<benchmark> with it."""
    src = source.rstrip("/\\")
    return safe_name(Path(src).stem if ("/" in src or "." in src or "\\" in src) else src, "data")


@dataclass(frozen=True)
class RunDir:
    root: Path
    # a stage index shared by several run directories (`ssb experiment`): a stage finished in one of them with the
    # same config and input hashes is copied instead of run again (`stage`, `StageIndex`)
    share: Path | None = None

    def __init__(self, root: str | Path, share: str | Path | None = None):
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "share", Path(share) if share is not None else None)

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
    grpo_dir = property(lambda self: self.rl_dir("grpo"))
    grpo_adapter = property(lambda self: self.rl_adapter("grpo"))
    grpo_metrics = property(lambda self: self.rl_metrics("grpo"))
    grpo_checkpoints = property(lambda self: self.rl_checkpoints("grpo"))

    # An RL baseline's files by its name: "grpo" (RUN/grpo) or "dr_grpo" (RUN/dr_grpo); the manifest stage has
    # the same name.
    RL_BASELINES = ("grpo", "dr_grpo")

    def rl_dir(self, name: str) -> Path:
        if name not in self.RL_BASELINES:
            raise ValueError(f"unknown RL baseline {name!r} (choose from {', '.join(self.RL_BASELINES)})")
        return self.root / name

    def rl_adapter(self, name: str) -> Path:
        return self.rl_dir(name) / "adapter"

    def rl_metrics(self, name: str) -> Path:
        return self.rl_dir(name) / "metrics.jsonl"

    def rl_checkpoints(self, name: str) -> Path:
        return self.rl_dir(name) / "checkpoints"

    def eval_dir(self, model_tag: str, benchmark: str) -> Path:
        """RUN/eval/<model>/<benchmark>, each part made directory-safe (`safe_name`)."""
        return self.root / "eval" / safe_name(model_tag, "model") / safe_name(benchmark, "data")

    @property
    def sft_run(self) -> RunDir:
        """The SFT baseline: a run directory of its own holding a copy of pairs.jsonl."""
        return RunDir(self.root / "sft")

    @property
    def batches_dir(self) -> Path:
        return self.root / "batches"

    def batch_dir(self, n: int) -> RunDir:
        """Batch n (1-based after the run's own questions, batch 0) drawn to reach teach.target_pairs."""
        return RunDir(self.batches_dir / f"batch-{n}")

    def batch_dirs(self) -> list[RunDir]:
        """The further question batches that exist, in order (none without teach.target_pairs)."""
        if not self.batches_dir.is_dir():
            return []
        found = [p for p in self.batches_dir.glob("batch-*") if p.is_dir() and p.name[6:].isdigit()]
        return [RunDir(p) for p in sorted(found, key=lambda p: int(p.name[6:]))]

    def round_dir(self, n: int) -> RunDir:
        return RunDir(self.root / f"round-{n}")

    def mkdir(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------------- manifest

    def read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}}
        try:
            manifest = json.loads(decode_utf8(self.manifest_path.read_bytes(), self.manifest_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.manifest_path}:{e.lineno}: corrupted manifest (not valid JSON)") from None
        stages = manifest.get("stages") if isinstance(manifest, dict) else None
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise ValueError(
                f"{self.manifest_path}: field 'stages': corrupted manifest (expected an object of stage entries); "
                "move it away to start the run's bookkeeping over"
            )
        return manifest

    def stage_entry(self, stage: str) -> dict | None:
        return self.read_manifest()["stages"].get(stage)

    def update_stage(self, stage: str, **fields: Any) -> None:
        manifest = self.read_manifest()
        manifest["stages"].setdefault(stage, {}).update(fields)
        atomic_write_json(self.manifest_path, manifest)


def rank_shard(path: Path, rank: int, size: int) -> Path:
    """The file rank `rank` of `size` processes appends its share of a data-parallel JSONL output to (`ssb.shards`):
    RUN/rollouts.jsonl -> RUN/rollouts.rank-1-of-4.jsonl. Rank 0 merges them into `path` at the end."""
    return path.with_name(f"{path.stem}.rank-{rank}-of-{size}{path.suffix}")


def rank_shards(path: Path) -> list[Path]:
    """Every rank's shard of `path` left in its directory, whatever the world size that wrote it."""
    return sorted(path.parent.glob(f"{glob_escape(path.stem)}.rank-*-of-*{glob_escape(path.suffix)}"))


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def rank_store(logits_dir: Path, rank: int, size: int) -> Path:
    """The teacher store rank `rank` of `size` writes its share of the logits to; rank 0 merges it into RUN/logits."""
    return logits_dir / f"rank-{rank}-of-{size}"


def rank_stores(logits_dir: Path) -> list[Path]:
    return sorted(p for p in logits_dir.glob("rank-*-of-*") if p.is_dir())


def move_aside(path: Path) -> Path:
    """Rename `path` (a file or a directory) to `<name>.stale-<time>` beside it and return the new path. The name is
    never one that exists: a second move within the same second gets `.stale-<time>-2` (then -3, ...), so no older
    copy is overwritten and a directory never meets "Directory not empty"."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        target = path.with_name(f"{path.name}.stale-{stamp}" + (f"-{n}" if n > 1 else ""))
        if os.path.lexists(target):
            continue
        try:
            path.rename(target)
        except OSError as e:  # a directory of that name appeared meanwhile
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        return target
    raise AssertionError("unreachable")
