"""Data parallelism across processes: who this process is, how the processes meet, and which records it owns.

ssb runs under the launchers users already have. `torchrun --nproc-per-node N -m ssb run ...` and
`accelerate launch --num_processes N -m ssb run ...` set RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/PORT);
a SLURM job step (`srun`) sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, which are read when RANK is absent
(the job script exports MASTER_ADDR and MASTER_PORT; docs/parallel.md). One process is world size 1 and
everything below is a no-op, so single-process runs never touch torch.distributed.

`init` joins the default process group (NCCL for CUDA tensors and gloo for CPU ones when CUDA is there, gloo
alone otherwise) before accelerate or the Trainer look for one: they reuse it, so training's DDP and the
generation stages share one group. Barriers and the small decisions rank 0 broadcasts (skip, resume, an error)
go through a separate gloo group. Both have a long timeout (SSB_DIST_TIMEOUT_S, default one day): a rank that
finishes its share of the rollouts waits at a barrier for the slowest one, which can take hours.

Which rank does a record: `share(ids)` sorts the stage's outstanding ids by a stable hash and deals them out in
turn, so the split does not depend on the order of the data and the ranks get equal numbers of records (a hash
modulo N gave 19 and 13 of 32 questions to 2 ranks); a record's random stream (keyed on seed, prompt and sample
index in the engine) does not depend on which rank or batch it landed in.
"""

from __future__ import annotations

import atexit
import datetime
import faulthandler
import hashlib
import os
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """This process's place among the launched processes (rank 0 of 1 when not launched by anything)."""
    size, rank, local = _env_int("WORLD_SIZE"), _env_int("RANK"), _env_int("LOCAL_RANK")
    if size is None and rank is None:  # SLURM without torchrun: one task per process
        size, rank, local = _env_int("SLURM_NTASKS"), _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID")
    size = size or 1
    rank = rank or 0
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside the world size {size} (RANK / WORLD_SIZE)")
    return World(rank=rank, size=size, local_rank=local if local is not None else rank)


_GROUP: Any = None  # the gloo group for barriers and broadcasts once `init` joined
_JOINED: World | None = None
SINGLE = World(rank=0, size=1, local_rank=0)


def current() -> World:
    """The world the stages split their work over: the joined one after `init`, else one process (so a library
    caller that never called `init` does all the work even with WORLD_SIZE in its environment)."""
    return _JOINED or SINGLE


def init() -> World:
    """Join the process group when launched with more than one process (idempotent); the world."""
    global _GROUP, _JOINED
    w = world()
    if w.size == 1 or _JOINED is not None:
        return w
    import torch
    import torch.distributed as dist

    for name, value in (("RANK", w.rank), ("WORLD_SIZE", w.size), ("LOCAL_RANK", w.local_rank)):
        os.environ.setdefault(name, str(value))  # SLURM: accelerate and the Trainer read these names
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(
                f"{w.size} processes but no {name}: launch with torchrun or accelerate launch, or export "
                "MASTER_ADDR and MASTER_PORT in the SLURM job script (docs/parallel.md)"
            )
    timeout = datetime.timedelta(seconds=_env_int("SSB_DIST_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", timeout=timeout)
    _GROUP = dist.new_group(backend="gloo", timeout=timeout)
    _JOINED = w
    atexit.register(_leave)
    # a rank that aborts or crashes (see `_leave`) prints every thread's Python stack to stderr, so the launcher's
    # log says where it was
    faulthandler.enable()
    return w


def _leave() -> None:
    """Leave the process group at exit, and let go of it while the interpreter is whole.

    A rank sometimes died after finishing its work with "terminate called without an active exception"
    (SIGABRT; twice in the default suite, in sessions of 2026-12-02 and 2026-12-05), the second time after
    `destroy_process_group` had run here. A likely mechanism (pytorch/pytorch#179291, not confirmed here): gloo's
    worker threads still hold work objects whose tensors reference Python objects; when the last reference goes
    during interpreter teardown, a thread asks for the GIL, and one refused it ends in std::terminate. So this
    module's own references go too, and the garbage collector runs now, so the groups are freed (and their
    threads joined) before teardown."""
    global _GROUP, _JOINED
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = _JOINED = None
    gc.collect()


def barrier() -> None:
    """Wait until every process gets here (nothing in one process)."""
    if _GROUP is not None:
        import torch.distributed as dist

        dist.barrier(group=_GROUP)


def broadcast(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (a small picklable object); `obj` itself in one process."""
    if _GROUP is None:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_GROUP)
    return box[0]


def all_gather(obj: Any) -> list:
    """Every rank's `obj` (small and picklable), in rank order; [obj] in one process."""
    if _GROUP is None:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size(group=_GROUP)
    dist.all_gather_object(out, obj, group=_GROUP)
    return out


def share(ids: list[str], w: World | None = None) -> set[str]:
    """This rank's part of `ids`: the ids sorted by a stable hash, dealt out in turn, so each rank gets
    len(ids) / size of them (to within one) whatever their order, and the split depends only on the set. Every
    rank of a launch must pass the same set (they all read the same merged files)."""
    w = w or current()
    if w.size == 1:
        return set(ids)
    ranked = sorted(set(ids), key=lambda i: (hashlib.sha256(str(i).encode()).digest(), str(i)))
    return set(ranked[w.rank :: w.size])
