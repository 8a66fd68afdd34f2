"""This process and the processes it started: the CPU seconds a block of work spent in them (a stage's compute),
and which of them run (to stop them on SIGTERM, `ssb.lifecycle`).

Wall seconds count what else the machine was doing (another job, a paused process); CPU seconds count the work:
user + system time of this process's threads, of its children that have exited (the kernel adds a reaped child's
time, and its own reaped children's, to the parent), and of descendants still running (a vLLM engine process, the
verifier workers), read from /proc on Linux. Reading the whole tree at both ends and subtracting counts each
descendant once, whether it exits during the block or not. A process that exits without being waited for by its
parent is lost; ssb's subprocesses are all waited for. Off Linux only this process and its reaped children count.
"""

from __future__ import annotations

import os
from pathlib import Path


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, utime + stime + cutime + cstime in clock ticks) of every process (Linux /proc; empty
    elsewhere)."""
    proc = Path("/proc")
    table: dict[int, tuple[int, int]] = {}
    if not (proc / "self" / "stat").exists():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # the process exited while we looked
            continue
        table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    return table


def descendants(root: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """The processes below `root` (children, their children, ...), parents before their children."""
    table = _process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def running(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped by its parent, counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants_seconds(root: int) -> float:
    """CPU seconds (own and reaped children's) of every live descendant of `root` (Linux; 0 elsewhere)."""
    table = _process_table()
    return sum(table[pid][1] for pid in descendants(root, table)) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process, its reaped children and its live descendants."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _descendants_seconds(os.getpid())


class CPUTime:
    """with CPUTime() as c: ...  then c.seconds is the CPU time the block took (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds, self.done = 0.0, False
        self._start = 0.0

    def __enter__(self) -> CPUTime:
        self._start = process_tree_cpu_seconds()
        return self

    def so_far(self) -> float:
        """The CPU time since the block started (inside it)."""
        return max(0.0, process_tree_cpu_seconds() - self._start)

    def __exit__(self, *exc: object) -> None:
        self.seconds, self.done = self.so_far(), True
