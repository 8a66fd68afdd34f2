"""A stage's life in a run directory: skip, resume or restart; the lock; the manifest entry; sharing.

`stage(run, name, config_parts, inputs, outputs)` wraps a stage's work (`ssb.stages`). It skips a stage that
finished with the same config and input hashes, resumes one that was interrupted, and moves the outputs of a
stale one aside (`ssb.rundir.move_aside`) before running it again; it holds a lock on the run directory while it
decides and works, so two processes never write one stage at once, and records the outcome (counts, wall and CPU
seconds, hashes, peak RSS, world size) in RUN/manifest.json (`ssb.rundir.RunDir`).

The CLI's process also stops its subprocesses (a vLLM engine, verifier workers) when it gets SIGTERM
(`stop_subprocesses_on_sigterm`), so none outlives a killed run.

Sharing between run directories (`ssb experiment`): a `RunDir(root, share=INDEX_DIR)` registers each stage it
finishes in INDEX_DIR under the stage's config and input hashes, the same two hashes `stage` checks before
skipping. When another run directory of the same share reaches a stage with equal hashes, `stage` copies the
outputs and the manifest entry (marked `shared_from`) instead of running it: equal hashes are exactly the condition
under which a stage's outputs would be reused within one run directory, so a shared stage is valid wherever a
skipped one is. The copy is checked against the donor's manifest first; a missing or changed donor means the stage
simply runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssb import parallel
from ssb.config import config_hash
from ssb.files import atomic_write_json, directory_lock, file_digest
from ssb.memory import PeakRSS
from ssb.processes import CPUTime, descendants, running
from ssb.rundir import RunDir, move_aside

_BEFORE_WORK: ContextVar[list | None] = ContextVar("ssb_before_work", default=None)
# the stages this process is running, with a function giving the time each has spent so far: on SIGTERM their
# manifest entries record that time (the process then dies, so its own manifest write can never follow)
_RUNNING: dict[tuple[str, str], tuple[RunDir, Callable[[], dict]]] = {}


def _stop_subprocesses_and_exit(signum: int, frame: Any) -> None:
    """On SIGTERM, stop the processes this one started, then end as SIGTERM would. Without this a vLLM engine
    (and its worker) outlived a killed ssb process, holding its memory (on a GPU, the GPU's). The stage is not
    unwound by an exception raised here: one raised inside vLLM's start-up deadlocked the start-up handshake.
    What was written is kept as after any kill (`ssb.files`: a torn last line is dropped on resume); the running
    stage is recorded as failed with the time it spent, which its resumption adds to its own."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for (_, name), (run, spent) in list(_RUNNING.items()):
        with contextlib.suppress(Exception):  # nothing may keep the process from stopping
            run.update_stage(name, status="failed", error="terminated (SIGTERM)", **spent())
    pids = descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 5  # vLLM's engine shuts down on SIGTERM once it is up; during start-up it does not
    while time.time() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    for pid in [p for p in pids if running(p)]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    print(
        f"\nssb: terminated (SIGTERM); {len(pids)} subprocess(es) stopped; finished work is saved, rerun the same "
        "command to resume",
        file=sys.stderr,
        flush=True,
    )
    os.kill(os.getpid(), signal.SIGTERM)


def stop_subprocesses_on_sigterm() -> None:
    """Install the SIGTERM handler above (from the main thread of the CLI's process; elsewhere it cannot be)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_subprocesses_and_exit)


def interrupted(verb: str) -> int:
    """Say that `ssb VERB` stopped on Ctrl-C (KeyboardInterrupt); the exit status a shell reports for it."""
    print(f"\nssb {verb}: interrupted; finished work is saved, rerun the same command to resume", file=sys.stderr)
    return 130


@contextlib.contextmanager
def before_work(action: Callable[[], None]) -> Iterator[None]:
    """Run `action` once: when the first stage inside the block starts work, or when the block ends without an
    error, whichever comes first. The CLI saves config.yaml this way: a command that fails on its config or inputs
    (checked before a stage starts) leaves the previous config.yaml as it was, while a stage that is killed
    mid-work resumes with the config it ran under."""
    pending = [action]
    token = _BEFORE_WORK.set(pending)
    try:
        yield
        _run_pending(pending)
    finally:
        _BEFORE_WORK.reset(token)


def _run_pending(pending: list | None) -> None:
    while pending:
        pending.pop()()


@dataclass
class Stage:
    """What a running stage reports back: counts go into the manifest, `summary` is printed."""

    name: str
    counts: dict
    resumed: bool
    checked: Any = None  # what the stage's `check` returned (its validated inputs)
    other_ranks_cpu_seconds: list[float] = field(default_factory=list)  # ranks 1.. of a stage split over ranks

    def say(self, line: str) -> None:
        if parallel.current().is_main:  # one voice: the ranks of a data-parallel stage would repeat each other
            print(line, flush=True)


@contextlib.contextmanager
def stage(
    run: RunDir,
    name: str,
    config_parts: tuple,
    inputs: list[Path],
    outputs: list[Path],
    force: bool = False,
    check: Callable[[], Any] | None = None,
    every_rank: bool = False,
) -> Iterator[Stage | None]:
    """Run a stage under the manifest's bookkeeping (`_stage_here`), in one process or across the launched ones.

    With several processes (`ssb.parallel`) rank 0 alone decides (skip, resume or start over), moves outputs
    aside and writes the manifest, which records the world size; the others follow its decision. A stage whose
    work is split over the ranks (`every_rank`: generation, teacher logits, DDP training) runs its body on every
    rank, each with its own `check()` result, and is recorded done only after every rank finished its share.
    Any other stage runs on rank 0 while the others wait, and its error reaches them as their own."""
    w = parallel.current()
    if w.size == 1:
        with _stage_here(run, name, config_parts, inputs, outputs, force, check) as st:
            yield st
        return
    if not w.is_main:
        decision = parallel.broadcast()
        if "error" in decision:
            raise ValueError(f"stage {name}: rank 0 stopped: {decision['error']}")
        if decision["skip"] or not every_rank:
            finished = parallel.broadcast()  # rank 0 did the stage (or skipped it) and wrote the manifest
            if "error" in finished:
                raise ValueError(f"stage {name}: rank 0 stopped: {finished['error']}")
            yield None
            return
        with CPUTime() as cpu:
            yield Stage(name=name, counts={}, resumed=decision["resumed"], checked=check() if check else None)
        parallel.all_gather(cpu.seconds)  # every rank's share is written; rank 0 adds up the CPU time
        parallel.broadcast()
        return
    outcome: dict = {}
    try:
        with contextlib.ExitStack() as stack:
            try:
                st = stack.enter_context(_stage_here(run, name, config_parts, inputs, outputs, force, check))
            except BaseException as e:  # bad input: tell the other ranks instead of leaving them waiting
                parallel.broadcast({"error": f"{type(e).__name__}: {e}"})
                outcome = {"told": True}
                raise
            parallel.broadcast({"skip": st is None, "resumed": bool(st and st.resumed)})
            try:
                yield st
            except BaseException as e:
                outcome = {"error": f"{type(e).__name__}: {e}"}
                raise
            if st is not None and every_rank:  # every rank's share is written before the stage counts as done
                st.other_ranks_cpu_seconds = parallel.all_gather(0.0)[1:]
    finally:
        if not outcome.get("told"):
            parallel.broadcast({"error": outcome["error"]} if "error" in outcome else {"done": True})


@contextlib.contextmanager
def _stage_here(run: RunDir, name: str, *spec) -> Iterator[Stage | None]:
    """`_stage_locked(run, name, *spec)` while holding a lock on the run directory (`directory_lock`): a second
    ssb process reaching a stage of the same run directory (two `ssb experiment --seeds` processes sharing the
    base model's evaluation, or a command started twice) waits, then decides from the manifest the first one
    left, so it skips what was finished instead of appending the same records a second time."""
    created = not run.root.exists()
    run.mkdir()
    try:
        with directory_lock(run.root, f"[{name}] another ssb process is working in {run.root}"):
            with _stage_locked(run, name, *spec) as st:
                yield st
    except BaseException:
        if created and not any(run.root.iterdir()):  # bad input on a fresh run directory: leave nothing behind
            with contextlib.suppress(OSError):  # another process has just started writing there
                run.root.rmdir()
        raise


@contextlib.contextmanager
def _stage_locked(
    run: RunDir,
    name: str,
    config_parts: tuple,
    inputs: list[Path],
    outputs: list[Path],
    force: bool = False,
    check: Callable[[], Any] | None = None,
) -> Iterator[Stage | None]:
    """Run a stage under the manifest's bookkeeping.

    Yields None when the stage already finished with the same config and inputs (the caller skips it). Otherwise
    `check` (reading and validating the stage's inputs; its result is `Stage.checked`) runs first, before anything
    is moved, written or recorded, so a stage that fails on bad input leaves the run directory as it was.
    A stage interrupted earlier with the same config resumes (its function reads what exists). If the config or
    inputs changed since, the old outputs are moved aside to `<name>.stale-<time>` (`move_aside`: nothing is deleted
    or overwritten) and the stage starts over; `force` does the same for a finished stage.
    """
    chash, ihash = stage_hashes(config_parts, inputs)
    entry = run.stage_entry(name) or {}
    same = entry.get("config_hash") == chash and entry.get("inputs_hash") == ihash
    if entry.get("status") == "done" and same and not force and all(p.exists() for p in outputs):
        print(f"[{name}] already done with the same config and inputs; skipping (--force reruns it)")
        yield None
        return
    if run.share is not None and not force and _adopt_shared(run, name, chash, ihash, outputs):
        yield None
        return
    checked = check() if check is not None else None
    run.mkdir()
    resumed = bool(entry) and same and not force and entry.get("status") in ("running", "failed")
    if not resumed:
        for p in outputs:
            if p.exists():
                move_aside(p)
    _run_pending(_BEFORE_WORK.get())
    # an interrupted attempt's time counts toward the stage (its records are kept, not redone); one killed by
    # SIGKILL never recorded its time, so the totals are lower bounds after such a kill
    prior = (entry.get("seconds") or 0.0, entry.get("cpu_seconds") or 0.0) if resumed else (0.0, 0.0)
    t0 = time.time()
    run.update_stage(
        name,
        status="running",
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config_hash=chash,
        inputs_hash=ihash,
        resumed=resumed,
        world_size=parallel.current().size,
    )
    st = Stage(name=name, counts={}, resumed=resumed, checked=checked)
    rss = PeakRSS()  # this stage's own peak resident memory, also when `ssb run` runs stages in one process
    cpu = CPUTime()

    def spent() -> dict:
        ranks = [cpu.seconds if cpu.done else cpu.so_far(), *st.other_ranks_cpu_seconds]
        out = {"seconds": round(prior[0] + time.time() - t0, 2), "cpu_seconds": round(prior[1] + sum(ranks), 2)}
        if len(ranks) > 1:  # this attempt's share of each rank, to see how evenly the work was split
            out["rank_cpu_seconds"] = [round(c, 2) for c in ranks]
        return out

    _RUNNING[(str(run.root), name)] = (run, spent)
    try:
        with rss, cpu:
            yield st
    except BaseException as e:
        run.update_stage(
            name,
            status="failed",
            error=f"{type(e).__name__}: {e}"[:500],
            counts=st.counts,
            peak_rss_bytes=rss.peak_bytes,
            **spent(),
        )
        raise
    finally:
        _RUNNING.pop((str(run.root), name), None)
    run.update_stage(
        name,
        status="done",
        ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
        counts=st.counts,
        error=None,
        peak_rss_bytes=rss.peak_bytes,
        **spent(),
    )
    if run.share is not None:
        _index_path(run.share, name, chash, ihash).parent.mkdir(parents=True, exist_ok=True)
        if not _index_path(run.share, name, chash, ihash).exists():
            atomic_write_json(_index_path(run.share, name, chash, ihash), {"run": str(run.root), "stage": name})


def stage_hashes(config_parts: tuple, inputs: list[Path]) -> tuple[str, str]:
    """(config hash, inputs hash) as the manifest records them: equal hashes mean the stage's outputs are valid."""
    ihash = hashlib.sha256("".join(file_digest(p) for p in inputs).encode()).hexdigest()[:16]
    return config_hash(*config_parts), ihash


def record_done(run: RunDir, name: str, config_parts: tuple, inputs: list[Path], counts: dict, **note: Any) -> None:
    """Mark stage `name` finished for outputs a caller wrote itself (e.g. rollouts derived from a larger K), so
    `stage` skips it while the config and inputs stay the same."""
    chash, ihash = stage_hashes(config_parts, inputs)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    run.update_stage(
        name,
        status="done",
        started=now,
        ended=now,
        seconds=0.0,
        cpu_seconds=0.0,
        config_hash=chash,
        inputs_hash=ihash,
        counts=counts,
        error=None,
        **note,
    )


# ---------------------------------------------------------------------------------------------- sharing


def _index_path(share: Path, name: str, chash: str, ihash: str) -> Path:
    return share / f"{name}-{chash}-{ihash}.json"


def _copy(src: Path, dst: Path) -> None:
    """Copy a file or directory to `dst` through a temporary name, so a kill never leaves half a copy there."""
    tmp = dst.with_name(f".{dst.name}.copy-tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _adopt_shared(run: RunDir, name: str, chash: str, ihash: str, outputs: list[Path]) -> bool:
    """Copy a finished stage with the same config and input hashes from another run directory of the share, and
    record it as done here (with `shared_from`). False when there is none, or its outputs are gone or changed."""
    index = _index_path(run.share, name, chash, ihash)
    if not index.exists():
        return False
    donor = RunDir(json.loads(index.read_text())["run"])
    if donor.root.resolve() == run.root.resolve():
        return False
    entry = donor.stage_entry(name) or {}
    sources = [donor.root / p.relative_to(run.root) for p in outputs]
    ok = entry.get("status") == "done" and entry.get("config_hash") == chash and entry.get("inputs_hash") == ihash
    if not ok or not all(p.exists() for p in sources):
        return False
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for src, dst in zip(sources, outputs):
        if dst.exists():
            dst.rename(dst.with_name(f"{dst.name}.stale-{stamp}"))
        _copy(src, dst)
    fields = {k: v for k, v in entry.items() if k not in ("resumed", "error")}
    run.update_stage(name, **fields, shared_from=str(donor.root), error=None)
    print(f"[{name}] same config and inputs as in {donor.root}: copied its outputs (shared, not rerun)", flush=True)
    return True
