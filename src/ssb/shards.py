"""Data-parallel JSONL outputs: each rank appends its records to a shard of its own, rank 0 merges the shards.

A generation stage writing RUN/rollouts.jsonl under N processes:

    with rank_output(run.rollouts, order=ids) as mine:   # rank 0 folds leftover shards in; barrier
        done = ids in RUN/rollouts.jsonl                 # every rank reads the same merged file
        ... append this rank's records (`parallel.share`) to `mine` (RUN/rollouts.rank-R-of-N.jsonl) ...
    # barrier; rank 0 merges every shard into RUN/rollouts.jsonl; barrier: every rank reads the merged file

The merge keeps one record per key (the first one read: a record never appears twice, even when a kill came
between writing the merged file and deleting the shards) and orders records by `order` (the stage's input
order), so the finished file does not depend on the number of processes, on resumes or on which rank or batch
finished first. Leftover
shards of a killed launch are folded in at the start of the next one, whatever its world size, so a rerun with
1 or 8 processes continues where the killed one stopped. In one process `path` itself is the output, put in input
order at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

from ssb import parallel
from ssb.files import read_jsonl, write_jsonl
from ssb.rundir import rank_shard, rank_shards


def by_id(record: dict) -> Hashable:
    return record.get("id")


def fold(path: Path, key: Callable[[dict], Hashable] = by_id, order: list | None = None, tidy: bool = False) -> int:
    """Merge every rank shard of `path` into `path` (deduplicated by `key`, sorted by position in `order`; keys
    not in it keep their file order after those that are) and delete the shards. The number of shards merged.
    `tidy`: put `path` in that order even without shards (a one-process stage writes in completion order)."""
    shards = rank_shards(path)
    if not shards and not (tidy and path.exists()):
        return 0
    original = read_jsonl(path)
    records, seen = [], set()
    for source in [path, *shards]:
        # a line torn by a kill is reported and dropped: that record is redone
        for rec in original if source == path else read_jsonl(source):
            k = key(rec) if isinstance(rec, dict) else None
            if k is not None and k in seen:  # a keyless line is kept for the stage's own check to name
                continue
            seen.add(k)
            records.append(rec)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        # stable: unknown keys keep their order
        records.sort(key=lambda r: rank.get(key(r) if isinstance(r, dict) else None, len(rank)))
    if records != original or shards:
        write_jsonl(path, records)  # atomic: a kill leaves the old file and the shards; the next fold redoes this
    for shard in shards:
        shard.unlink()
    return len(shards)


@contextlib.contextmanager
def rank_output(path: Path, key: Callable[[dict], Hashable] = by_id, order: list | None = None) -> Iterator[Path]:
    """The file this rank appends to; around it, the folds and barriers described in the module docstring. On an
    error nothing is merged: the shards stay for the rerun to fold in."""
    w = parallel.current()
    if w.is_main:
        fold(path, key, order)
    parallel.barrier()
    yield path if w.size == 1 else rank_shard(path, w.rank, w.size)
    parallel.barrier()
    if w.is_main:
        fold(path, key, order, tidy=True)  # the input order, whatever the world size or the resumes
    parallel.barrier()
