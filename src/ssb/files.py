"""Crash-safe file IO shared by every part of ssb: atomic writes, appended JSONL, content digests.

Writes are atomic (temp file + fsync + rename) and JSONL files are appended one flushed record at a time, so a
killed process never leaves a half-written file that a later run trusts: `read_jsonl` drops a torn last line and
says so (naming file and line), and the stage that writes the file redoes that record when it resumes.
Text read from users' files is decoded by `decode_utf8`, whose error names the file and line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def decode_utf8(data: bytes, path: str | Path) -> str:
    """`data` as text (a leading byte-order mark dropped); not UTF-8 is a ValueError naming file, line and column."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def read_json_object(path: str | Path, hint: str = "") -> dict:
    """A JSON file holding one object; not UTF-8, not JSON or not an object is a ValueError naming the file (and
    line), followed by `hint`."""
    path = Path(path)
    try:
        data = json.loads(decode_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}){hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object{hint}")
    return data


def read_text(path: str | Path) -> str:
    """A user's text file (YAML, template, JSON) as a string; see `decode_utf8`."""
    return decode_utf8(Path(path).read_bytes(), path)


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

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | Path, *, repair: bool = True, lines: bool = False) -> list:
    """Read our own JSONL artifact. A torn last line (killed mid-write: not JSON, or cut inside a UTF-8 character)
    is dropped with a warning naming file and line, and with `repair` cut from the file so appends continue
    cleanly; the stage that writes the file redoes that record when it resumes. A complete last record whose
    newline was lost gets it back (with `repair`), so the next append starts a line of its own. A bad line
    elsewhere is corruption: an error naming it. `lines`: (line number, record) pairs instead of records."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    chunks = raw.split(b"\n")
    records, good_bytes = [], 0
    for i, line in enumerate(chunks):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rec = json.loads(line)
            records.append((i + 1, rec) if lines else rec)
            good_bytes += len(line) + 1
        except (ValueError, RecursionError):  # not JSON, cut inside a UTF-8 character, or nested too deeply
            if i == len(chunks) - 1:  # last line without newline: a record cut off by a kill
                print(
                    f"ssb: warning: {path}:{i + 1}: dropped an incomplete last record (its writer was interrupted); "
                    f"rerunning the stage that writes {path.name} redoes it",
                    file=sys.stderr,
                    flush=True,
                )
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(min(good_bytes, len(raw)))
                break
            raise ValueError(
                f"{path}:{i + 1}: corrupted record (not valid JSON or not UTF-8); delete the file or rerun the stage "
                "with --force"
            ) from None
    else:
        if repair and raw and not raw.endswith(b"\n"):
            with open(path, "ab") as f:
                f.write(b"\n")
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


_HELD_LOCKS: dict[str, int] = {}  # directory -> nesting depth: re-entrant within one process


@contextlib.contextmanager
def directory_lock(directory: str | Path, waiting: str) -> Iterator[None]:
    """Hold an advisory lock on an existing `directory` for the block; another process waits for it.

    The lock is taken on the directory itself (flock on its descriptor), so no lock file is left behind
    and a crashed holder releases it with its descriptors. Re-entrant within a process: a nested block on
    the same directory goes straight in, since flock locks belong to an open descriptor and a second one
    opened by the same process would wait for itself. `waiting` is printed once when another process holds
    the lock. Without `fcntl` (Windows) the block runs unlocked."""
    key = os.path.abspath(directory)
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(key, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{waiting}; waiting for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD_LOCKS[key] = 1
        try:
            yield
        finally:
            del _HELD_LOCKS[key]
    finally:
        os.close(fd)  # closing releases the lock
