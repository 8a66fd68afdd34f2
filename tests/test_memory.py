"""Per-stage peak memory (ssb.memory.PeakRSS) and its place in the manifest."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from ssb.lifecycle import stage
from ssb.memory import PeakRSS, current_rss_bytes
from ssb.rundir import RunDir


def test_peak_rss_sees_a_short_lived_allocation_and_a_later_block_does_not_inherit_it():
    base = current_rss_bytes()
    with PeakRSS(interval=0.05) as first:
        x = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched
        time.sleep(0.3)
        del x
    assert first.peak_bytes >= base + 150 * 2**20
    with PeakRSS(interval=0.05) as second:  # ru_maxrss still holds the first peak; this block's must not
        time.sleep(0.2)
    assert second.peak_bytes < first.peak_bytes - 100 * 2**20


def test_stage_records_its_peak_rss(tmp_path):
    run = RunDir(tmp_path / "run")
    with stage(run, "demo", ("x",), inputs=[], outputs=[]) as st:
        st.counts["n"] = 1
    entry = run.stage_entry("demo")
    assert entry["status"] == "done" and entry["peak_rss_bytes"] > 10 * 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_release_free_memory_returns_freed_heap_to_the_os():
    """Blocks below glibc's mmap threshold stay resident after they are freed (a stage's peak would carry into the
    next stage of `ssb run`); release_free_memory gives them back."""
    from ssb.memory import current_rss_bytes, release_free_memory

    release_free_memory()
    base = current_rss_bytes()
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~200 MB in heap-sized blocks
    for b in blocks:
        b[::4096] = b"x" * len(b[::4096])  # touch every page
    held = current_rss_bytes()
    assert held - base > 150 * 2**20
    del blocks
    release_free_memory()
    assert current_rss_bytes() - base < 50 * 2**20
