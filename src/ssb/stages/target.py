"""Reaching `teach.target_pairs`: further batches of fresh training questions until the run holds enough pairs.

The run's own questions (data.train: offset, limit) are batch 0. Batch n (n >= 1) takes the next data.train.limit
questions (offset + n x limit, so never a question seen before) and runs rollout, curate and teach on them in
RUN/batches/batch-N/, a run directory of its own with its own manifest; its new pairs are then appended to
RUN/pairs.jsonl, up to the target (later stages read only that file). Drawing stops when the target is met, after
teach.max_batches batches in all, or when data.train has no further questions; the teach counts say which.

Every step resumes: a batch's stages skip themselves once done, its files resume mid-stage, and appending skips
pairs already in RUN/pairs.jsonl, so a killed run continues without redoing or duplicating anything.

The yield funnel over all batches: questions (rolled out) -> mixed (curated) -> teacher attempts -> verified
(the answer checks) -> kept (verified and stopped on its own) -> pairs (kept, within the target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ssb import parallel
from ssb.config import Config
from ssb.files import JsonlWriter, read_jsonl
from ssb.rundir import RunDir

ARITH_DEFAULT_LIMIT = 500  # what data.train.limit = null means for arith (ssb.data.loaders)


def batch_config(cfg: Config, n: int, size: int) -> Config:
    """Batch n's config: the next `size` questions of data.train, and a teach stage without a target."""
    spec = cfg.data.train
    data = dataclasses.replace(cfg.data, train=dataclasses.replace(spec, offset=spec.offset + n * size, limit=size))
    teach = dataclasses.replace(cfg.teach, target_pairs=None)
    return dataclasses.replace(cfg, data=data, teach=teach)


def draw_batches(cfg: Config, run: RunDir, teach: Callable[[Config, RunDir], dict]) -> tuple[list[RunDir], dict]:
    """Run further batches until RUN/pairs.jsonl holds teach.target_pairs pairs; (batch dirs, target counts).
    `teach` is the teach stage (passed in by it: this module is its helper, so it does not import it back)."""
    from ssb.data import question_records
    from ssb.stages.curate import curate
    from ssb.stages.rollout import rollout

    tc, spec = cfg.teach, cfg.data.train
    target = tc.target_pairs
    size = spec.limit if spec.limit is not None else (ARITH_DEFAULT_LIMIT if spec.source == "arith" else None)
    dirs: list[RunDir] = []
    have = len(read_jsonl(run.pairs))
    reason = None
    n = 1
    while have < target:
        if size is None:
            reason = "data.train.limit is unset, so the first batch took every question; set it to draw batches"
            break
        if n >= tc.max_batches:
            reason = f"teach.max_batches = {tc.max_batches} batches of {size} questions drawn"
            break
        bcfg = batch_config(cfg, n, size)
        try:
            fresh = question_records(bcfg.data.train)
        except ValueError as e:  # the built-in generator's pool is exhausted
            reason = f"no further training questions ({e})"
            break
        if not fresh:
            reason = f"data.train has no questions after the first {n * size}"
            break
        brun = run.batch_dir(n).mkdir()
        dirs.append(brun)
        print(f"[teach] {have} of {target} pairs: batch {n + 1} of at most {tc.max_batches} ({brun.root})", flush=True)
        rollout(bcfg, brun)
        if curate(bcfg, brun).get("kept"):
            teach(bcfg, brun)
        if parallel.current().is_main:
            append_pairs(run, brun, target)
        parallel.barrier()
        have = len(read_jsonl(run.pairs))
        n += 1
    counts = {
        "target_pairs": target,
        "target_reached": have >= target,
        "batches": 1 + len(dirs),
        "shortfall_reason": None if have >= target else reason,
    }
    return dirs, counts


def append_pairs(run: RunDir, batch: RunDir, target: int) -> int:
    """Append the batch's pairs not yet in RUN/pairs.jsonl, up to `target` in all; the new count."""
    existing = {p["id"] for p in read_jsonl(run.pairs)}
    new = [p for p in read_jsonl(batch.pairs) if p["id"] not in existing]
    room = max(0, target - len(existing))
    with JsonlWriter(run.pairs) as out:
        for p in new[:room]:
            out.write(p)
    return len(existing) + min(room, len(new))


def funnel(batches: list[RunDir], pairs: int) -> dict:
    """The yield funnel over batches (the run first): questions -> mixed -> attempts -> verified -> kept -> pairs."""
    attempts = [a for b in batches for a in read_jsonl(b.teach_attempts)]
    return {
        "questions": sum(len(read_jsonl(b.rollouts)) for b in batches),
        "mixed": sum(len(read_jsonl(b.curated)) for b in batches),
        "teacher_attempts": len(attempts),
        "verified": sum(bool(a["correct"]) for a in attempts),
        "kept": sum(bool(a["kept"]) for a in attempts),
        "pairs": pairs,
    }


def funnel_line(counts: dict) -> str:
    """`[teach] funnel: 256 questions -> 110 mixed -> 110 teacher attempts -> 24 verified -> 20 kept -> 20 pairs`,
    and with a target whether it was reached, and if not, why."""
    f = counts["funnel"]
    line = (
        f"[teach] funnel: {f['questions']} questions -> {f['mixed']} mixed -> {f['teacher_attempts']} teacher "
        f"attempts -> {f['verified']} verified -> {f['kept']} kept -> {f['pairs']} pairs"
    )
    if counts.get("target_pairs") is None:
        return line
    batches = f"{counts['batches']} batch{'es' if counts['batches'] > 1 else ''}"
    if counts["target_reached"]:
        return f"{line}; target {counts['target_pairs']} reached with {batches}"
    return (
        f"{line}; TARGET {counts['target_pairs']} NOT REACHED with {batches}: {counts['shortfall_reason']} "
        f"(raise teach.max_batches or teach.attempts, or data.train.limit)"
    )
