"""Peak resident memory (RSS) of a block of work, such as one stage, even when several stages share a process.

`ru_maxrss` is the peak of the whole process lifetime, so a later stage of `ssb run` would inherit an earlier
stage's peak. `PeakRSS` combines two readings: a sampler thread reading the current RSS every `interval`
seconds during the block (catches the block's own plateau), and ru_maxrss, which counts only when it rose during
the block (then the new lifetime peak was reached inside the block, and it is exact, including spikes shorter
than the sampling interval). Child processes (verifier workers) are not included.
"""

from __future__ import annotations

import os
import resource
import sys
import threading


def current_rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; elsewhere the lifetime peak, the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return lifetime_peak_rss_bytes()


def lifetime_peak_rss_bytes() -> int:
    """ru_maxrss in bytes (the OS reports kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_free_memory() -> None:
    """Give memory that is free inside the process back to the OS (Linux/glibc: malloc_trim), after a collection.

    `ssb run` runs every stage in one process. glibc keeps freed heap blocks (below its mmap threshold, which
    grows to 32 MB as large tensors come and go) for reuse, so without this a stage's peak stays resident into
    the next ones and a later stage's own peak sits on top of it. Called when a stage or evaluation starts (the
    previous stage's objects are gone by then) and when it ends."""
    import gc

    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # another libc (musl): nothing to trim
            pass


class PeakRSS:
    """with PeakRSS() as m: ...  then m.peak_bytes is the block's peak RSS (see the module docstring)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak_bytes = interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, current_rss_bytes())

    def __enter__(self) -> PeakRSS:
        release_free_memory()  # what the previous stage left (its objects are gone now) is not this block's
        self._start_lifetime = lifetime_peak_rss_bytes()
        self.peak_bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        release_free_memory()  # before the last reading: what the block freed is not its peak, nor the next one's
        self._stop.set()
        self._thread.join()
        end = lifetime_peak_rss_bytes()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes(), end if end > self._start_lifetime else 0)
