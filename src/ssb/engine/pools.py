"""Segment pools: the KV storage behind the engine's paged caches (`ssb.engine.cache`).

A sequence of positions (a prompt's, or the tokens a sequence generates) is cut into segments of `length`
positions. Segment j is a pool [layers, slots, kv_heads, length, head_dim] of K and one of V, holding segment j
for every owner (a generating row, or a prompt slot) that has reached it. An owner takes a slot in pool j when it
first writes there and gives all its slots back when it finishes (the lowest free slot is taken first); a pool
exists from its first owner's arrival until it empties. So the memory follows the positions in flight, not the
longest sequence any owner could have, and a finished owner's slots are reused without copying anyone's KV.

How a pool gets its memory depends on the device. On CPU it is reserved at once for every owner that can exist
(`limit`) with `torch.empty`, which the OS backs with pages only where they are written; a slot is zeroed when
it is first taken, so the resident size is the pool's high-water mark of slots, reached without a copy. (The
first version grew pools by a quarter, copying them: a growing pool briefly existed twice, and the quick
preset's rollouts allocated 1.5-1.7x the KV in use.) Finished owners leave holes below the high-water mark, so
`compact` (once per decode step) moves the owners above the live count down into the holes (a copy of the
moved slots only) and gives the pages above back to the OS (`madvise(MADV_DONTNEED)`, Linux): the resident
size then follows the slots in use as the work shrinks, not its peak. On other devices, which commit what they
allocate, a pool grows by a quarter when full (copied: O(log n) copies, at most 25% larger than its peak use).

Both pools of a cache share one `KVMeter`: the bytes allocated (CPU: touched) and their peak, including the
moment during a growth when the old and the new pool both exist.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

LAZY_ON_CPU = True  # reserve-and-touch pools on CPU (the module docstring); tests turn it off to run the copy path
# compact a CPU pool when more than this share of its touched slots is free: each compaction copies only the
# moved slots (1.5 MB per slot for SmolLM2-135M's 64-position segments), far less than a decode step reads
COMPACT_FREE_SHARE = 1 / 8
_MADV_DONTNEED = 4  # Linux: anonymous pages read back as zeros and stop counting as resident
# elsewhere compaction would copy slots without giving memory back: `compact` does nothing there
CAN_GIVE_BACK_PAGES = sys.platform.startswith("linux")


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _give_back_pages(x: torch.Tensor, lo: int, hi: int) -> bool:
    """Return to the OS the whole pages inside slots [lo, hi) of every layer of x [layers, slots, ...] (contiguous
    CPU tensor). False where the OS call is not available or fails (then the pages stay)."""
    if not CAN_GIVE_BACK_PAGES or hi <= lo:
        return False
    libc = _libc()
    page = mmap.PAGESIZE
    slot_bytes = x[0, 0].numel() * x.element_size()
    base = x.data_ptr()
    for layer in range(x.shape[0]):
        start = base + (layer * x.shape[1] + lo) * slot_bytes
        end = base + (layer * x.shape[1] + hi) * slot_bytes
        start, end = -(-start // page) * page, end // page * page  # whole pages inside the range only
        if end > start and libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
            return False
    return True


class KVMeter:
    """Bytes of KV pools allocated now and at the peak."""

    def __init__(self) -> None:
        self.allocated = self.peak_allocated = 0

    def grown(self, new_bytes: int, old_bytes: int) -> None:
        self.peak_allocated = max(self.peak_allocated, self.allocated + new_bytes)  # both exist during the copy
        self.allocated += new_bytes - old_bytes

    def freed(self, nbytes: int) -> None:
        self.allocated -= nbytes


class SegmentPools:
    """`segments` pools of `length` positions each; owners are non-negative ints (row ids or prompt slots).

    k[j], v[j]: [layers, capacity_j, kv_heads, length, head_dim] or None; owner[j][s]: the owner of slot s of pool
    j (-1: free); slots_of[o]: owner o's slot in pools 0, 1, ... in order (an owner holds a prefix of the
    segments). `limit`: most slots a pool may hold (the number of owners that can exist at once)."""

    def __init__(self, segments: int, length: int, shape: tuple[int, int, int], dtype, device, meter: KVMeter):
        self.segments, self.length = segments, length
        self.layers, self.kv_heads, self.head_dim = shape
        self.dtype, self.device, self.meter = dtype, device, meter
        self.limit = 1
        self.k: list[torch.Tensor | None] = [None] * segments
        self.v: list[torch.Tensor | None] = [None] * segments
        self.owner: list[list[int]] = [[] for _ in range(segments)]
        self.live = [0] * segments
        self.slots_of: dict[int, list[int]] = {}
        # CPU: a pool is reserved at `limit` slots with torch.empty, which the OS backs with memory only where it
        # is written, and slots are zeroed when first taken (`touched`: the high-water mark), so resident memory
        # follows the slots used, with no copy and no old-plus-new moment when a pool grows. Other devices
        # commit what they allocate: there pools grow by copying (`_grow`).
        self.lazy = LAZY_ON_CPU and torch.device(device).type == "cpu"
        self.touched = [0] * segments

    def _bytes(self, j: int) -> int:
        if self.k[j] is None:
            return 0
        slots = self.touched[j] if self.lazy else self.k[j].shape[1]
        return 2 * slots * self.k[j][:, :1].numel() * self.k[j].element_size()

    def reserve(self, j: int, need: int) -> None:
        """Room for `need` owners in pool j (at most `limit`)."""
        if self.lazy:
            if self.k[j] is None:
                shape = (self.layers, self.limit, self.kv_heads, self.length, self.head_dim)
                self.k[j], self.v[j] = (torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))
                self.owner[j] = [-1] * self.limit
                self.touched[j] = 0
            return
        self._grow(j, need)

    def _grow(self, j: int, need: int) -> None:
        """Grow pool j by a quarter (at least to `need`, at most to `limit`), copying it. Small pools grow one slot
        at a time; their copies are cheap."""
        capacity = len(self.owner[j])
        if need <= capacity:
            return
        capacity = min(self.limit, max(need, capacity + capacity // 4))  # no floor: deep segments hold few
        shape = (self.layers, capacity, self.kv_heads, self.length, self.head_dim)
        # zeros, not empty: a free or partly written slot is still multiplied by 0 in attention and must not be NaN
        new_k, new_v = (torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(2))
        old = self._bytes(j)
        self.meter.grown(2 * new_k.numel() * new_k.element_size(), old)
        if self.k[j] is not None:
            new_k[:, : self.k[j].shape[1]] = self.k[j]
            new_v[:, : self.v[j].shape[1]] = self.v[j]
        self.k[j], self.v[j] = new_k, new_v
        self.owner[j].extend([-1] * (capacity - len(self.owner[j])))

    def take(self, j: int, owner: int) -> int:
        """A slot in pool j for `owner`, which is about to write its first position there; returns the slot."""
        self.reserve(j, self.live[j] + 1)
        slot = self.owner[j].index(-1)
        if self.lazy and slot >= self.touched[j]:  # first use of this slot: zero it (masked entries must not be NaN)
            before = self._bytes(j)
            self.k[j][:, self.touched[j] : slot + 1] = 0
            self.v[j][:, self.touched[j] : slot + 1] = 0
            self.touched[j] = slot + 1
            self.meter.grown(self._bytes(j) - before, 0)
        self.owner[j][slot] = owner
        self.live[j] += 1
        self.slots_of.setdefault(owner, []).append(slot)
        return slot

    def release(self, owner: int) -> None:
        """`owner` gives its slots back; a pool nobody uses any more is freed."""
        for j, slot in enumerate(self.slots_of.pop(owner, [])):
            self.owner[j][slot] = -1
            self.live[j] -= 1
            if self.live[j] == 0:
                self.meter.freed(self._bytes(j))
                self.k[j] = self.v[j] = None
                self.owner[j] = []
                self.touched[j] = 0

    def compact(self) -> None:
        """CPU pools: where more than COMPACT_FREE_SHARE of a pool's touched slots are free, move the owners above
        the live count into the free slots below it and give the pages above back (module docstring). Call
        between steps: it changes owners' slots. Linux only (CAN_GIVE_BACK_PAGES)."""
        if not self.lazy or not CAN_GIVE_BACK_PAGES:
            return
        for j in range(self.segments):
            live, top = self.live[j], self.touched[j]
            if self.k[j] is None or top - live < max(2, COMPACT_FREE_SHARE * top):
                continue
            owner = self.owner[j]
            holes = [s for s in range(live) if owner[s] < 0]
            movers = [s for s in range(live, top) if owner[s] >= 0]  # as many as holes
            if movers:
                src, dst = torch.tensor(movers), torch.tensor(holes)
                self.k[j][:, dst] = self.k[j][:, src]
                self.v[j][:, dst] = self.v[j][:, src]
                for a, b in zip(movers, holes):
                    owner[b], owner[a] = owner[a], -1
                    self.slots_of[owner[b]][j] = b
            if _give_back_pages(self.k[j], live, top) and _give_back_pages(self.v[j], live, top):
                before = self._bytes(j)
                self.touched[j] = live  # slots above are zeroed again when next taken (`take`)
                self.meter.freed(before - self._bytes(j))

    def relabel(self, old: int, new: int) -> None:
        """Owner `old` is now called `new` (its KV stays where it is)."""
        slots = self.slots_of.pop(old, [])
        for j, slot in enumerate(slots):
            self.owner[j][slot] = new
        if slots:
            self.slots_of[new] = slots

    def used(self, j: int) -> int:
        """One past the highest occupied slot of pool j (the slots attention reads)."""
        owner = self.owner[j]
        top = self.touched[j] if self.lazy else len(owner)  # CPU pools: no slot past the high-water mark is used
        return next((s + 1 for s in range(top - 1, -1, -1) if owner[s] >= 0), 0)  # from the top: once per step
