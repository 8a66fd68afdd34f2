"""Worker processes for answer verification, each item bounded by its own deadline.

`WorkerPool.run` sends (text, gold, how) items to `ssb.verify.worker` subprocesses, which read the answer
(`ssb.verify.extract.prejudge`: extraction for a completion, cleaning for an answer) and, unless that already
decides, run `ssb.verify.equiv.compare`. A worker that overruns an item's deadline (sympy can hang on inputs such
as `5^{5^{5^5}}`; extraction is linear, but a megabyte of text still takes time) or dies is killed and replaced,
and the item gets the verdict "timeout". Deadlines
are enforced by the parent with `select`, not signals, so the pool works from any thread. Workers
are plain subprocesses (multiprocessing's spawn/forkserver would re-import the caller's __main__)
and die with the parent process (Linux PR_SET_PDEATHSIG), even while stuck inside sympy.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

from ssb.verify.equiv import compare
from ssb.verify.extract import prejudge

log = logging.getLogger(__name__)
_WORKER_MAIN = "import os, sys; from ssb.verify.worker import _serve; _serve(*map(int, sys.argv[1:])); os._exit(0)"


def _serve(parent_pid: int, memory_limit: int) -> None:
    """Worker loop (`ssb.verify.worker`): JSON lines [key, text, gold, how] in on stdin,
    [key, extracted, rule, verdict] out on stdout, until stdin closes."""
    import json
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:  # Linux: die with the parent even while stuck inside sympy
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        return
    if memory_limit > 0:
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        except (ImportError, ValueError, OSError):
            pass
    # Replies go to a private copy of stdout; anything a library prints lands on stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    compare("1", "1")  # import sympy / math-verify before saying ready: deadlines time work only
    prejudge("\\boxed{1}", "1", "lenient")
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        key, text, gold, how = json.loads(line)
        extracted = rule = None
        try:
            found, pred, verdict = prejudge(text, gold, how)
            extracted, rule = found.answer, found.rule
            if verdict is None:
                verdict = compare(pred, gold)
        except MemoryError:
            verdict = "timeout"  # over the memory bound: a resource limit, like the deadline
        except Exception:  # noqa: BLE001 - one bad answer must not end the worker
            log.exception("verification failed for text=%r gold=%r", text[:80], gold[:80])
            verdict = "incorrect"
        out.write(json.dumps([key, extracted, rule, verdict]) + "\n")
        out.flush()


_spawn_requests: queue.Queue = queue.Queue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    import subprocess

    while True:
        done, result, args, kwargs = _spawn_requests.get()
        try:
            result.append(subprocess.Popen(args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result.append(e)
        done.set()


def _popen_from_spawner_thread(args: list[str], **kwargs):
    """Popen, run in one long-lived daemon thread. The worker's PR_SET_PDEATHSIG fires when the
    *thread* that started it ends, so starting workers from a short-lived caller thread would kill
    them when that thread returns; the spawner thread lives until the process exits."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="ssb-verify-spawner", daemon=True)
            _spawner.start()
    done, result = threading.Event(), []
    _spawn_requests.put((done, result, args, kwargs))
    done.wait()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class _Worker:
    """One `ssb.verify.worker`  subprocess. A plain subprocess (not multiprocessing), so
    it never re-imports the caller's __main__ and is not forked from a threaded parent."""

    def __init__(self, memory_limit: int, start_timeout: float):
        import subprocess
        import sys
        import time

        src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self.proc = _popen_from_spawner_thread(
            # -c, not -m: running a package's submodule as __main__ would import it twice; os._exit skips a
            # slow interpreter teardown of sympy's modules
            [sys.executable, "-c", _WORKER_MAIN, str(os.getpid()), str(memory_limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self.buf = b""
        self.state, self.task, self.deadline = "starting", None, time.monotonic() + start_timeout

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, key: int, text: str, gold: str, how: str) -> bool:
        import json

        try:
            self.proc.stdin.write((json.dumps([key, text, gold, how]) + "\n").encode())
            return True
        except OSError:  # died between items
            return False

    def receive(self) -> list | None:
        """Complete messages now readable; None once the worker has died."""
        import json

        chunk = os.read(self.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        messages = []
        for line in filter(bytes.strip, lines):
            try:
                messages.append(json.loads(line))
            except ValueError:
                log.warning("ignoring stray worker output: %r", line[:200])
        return messages

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class WorkerPool:
    """Up to `workers` worker processes reading and comparing answers, each item bounded by its own deadline.

    `run` may be called from any thread (one call at a time; callers hold a lock). A worker that
    overruns an item's deadline, or dies on it, is killed and replaced and the item gets "timeout".
    """

    def __init__(self, workers: int = 2, memory_limit: int = 4 << 30, start_timeout: float = 120.0):
        self.size, self.memory_limit, self.start_timeout = max(1, workers), memory_limit, start_timeout
        self.workers: list[_Worker] = []
        self.timeouts = 0
        self.crashes = 0

    def _spawn(self) -> _Worker:
        return _Worker(self.memory_limit, self.start_timeout)

    def run(self, items: list[tuple[str, str, str]], timeout: float) -> list[tuple[str | None, str | None, str]]:
        """(extracted, rule, verdict) per (text, gold, how) item; (None, None, "timeout") for an item whose worker
        overran the deadline or died."""
        import time
        from collections import deque
        from multiprocessing.connection import wait

        if not items:
            return []
        while len(self.workers) < min(self.size, len(items)):
            self.workers.append(self._spawn())
        results: list[tuple | None] = [None] * len(items)
        pending = deque(range(len(items)))
        left = len(items)
        while left:
            for w in self.workers:
                if w.state == "idle" and pending:
                    i = pending[0]
                    w.state, w.task, w.deadline = "busy", i, time.monotonic() + timeout
                    if w.send(i, *items[i]):
                        pending.popleft()
                    else:
                        left -= self._replace(w, results, crashed=True)
            active = [w for w in self.workers if w.state != "idle"]
            now = time.monotonic()
            for w in wait(active, timeout=max(0.0, min(w.deadline for w in active) - now)):
                messages = w.receive()
                if messages is None:  # the worker died (segfault, OOM kill)
                    left -= self._replace(w, results, crashed=True)
                    continue
                for msg in messages:
                    if msg == "ready":
                        w.state = "idle"
                    elif w.state == "busy" and msg[0] == w.task:
                        results[msg[0]], w.state, w.task = tuple(msg[1:]), "idle", None
                        left -= 1
            now = time.monotonic()
            for w in list(self.workers):
                if w.state != "idle" and now >= w.deadline:
                    left -= self._replace(w, results, crashed=False)
        return [r if r is not None else (None, None, "timeout") for r in results]

    def _replace(self, w: _Worker, results: list, crashed: bool) -> int:
        """Kills `w`, gives its item (if any) a "timeout" verdict, starts a fresh worker."""
        w.kill()
        if w.state == "starting":
            self.close()
            how = "exited during start-up" if crashed else f"did not start within {self.start_timeout:.0f} s"
            raise RuntimeError(f"verification worker {how} (python -m ssb.verify.worker)")
        self.workers[self.workers.index(w)] = self._spawn()
        if w.state != "busy":
            return 0
        results[w.task] = (None, None, "timeout")
        if crashed:
            self.crashes += 1
            log.warning("verification worker died on an item; counted as timeout")
        else:
            self.timeouts += 1
        return 1

    def close(self) -> None:
        for w in self.workers:
            try:
                w.proc.stdin.close()  # EOF: an idle worker exits at once
            except OSError:
                pass
        for w in self.workers:
            try:
                w.proc.wait(timeout=1)
            except Exception:  # noqa: BLE001 - busy or stuck: kill it
                w.proc.kill()
                w.proc.wait()
            w.proc.stdout.close()
        self.workers = []
