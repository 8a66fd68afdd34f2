"""The fused CPU decode-attention kernel (csrc/decode_attention.cpp): built on first use, else the torch path.

`SlotModel.decode` (ssb.engine.cache) needs, per layer, attention of every sequence's new query over its prompt
segments and its generated segments. The torch path does that with a dozen small ops per cache part (batched
matmuls, casts, mask, softmax pieces, scatter, merge); profiled at batch 256 they took more time than the model's
linear layers. The kernel does the same in one pass per (sequence, kv head) with an online softmax, reading
each key and value once in place from the pools; it also applies the rotary embedding to the step's queries and
key and writes the step's K/V into the cache. With bf16 caches on a CPU with AVX512-BF16 the scores use the bf16
dot-product instruction on the stored keys (the queries rounded to bf16, as the torch path's bf16 matmul does).

It is compiled once per machine with torch's C++ extension JIT (needs a C++ compiler with OpenMP; the `ninja`
build tool is a dependency) into `$SSB_CACHE/kernels/<hash>` (default ~/.cache/ssb), the hash covering the
source, compiler flags, torch and Python versions and the CPU's instruction sets (the build targets the CPU it
runs on). Before use, each build is compared with a float64 brute-force reference on small random caches
(`self_check`, about 7 ms, once per process). If the build or the check fails (no compiler, Apple clang without
OpenMP, a compiler that mis-builds the vector code, ...) the engine says so in one line and uses the torch path,
which computes the same attention (tests/test_attention_kernel.py and tests/test_engine_paged.py run both).
`SSB_ATTENTION_KERNEL=0` forces the torch path; `=1` makes a failed build an error instead of a fallback.

Results do not depend on the thread count or on which other sequences are in the batch: each (sequence, kv
head) is computed by one thread in a fixed order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
# -march=native: the build is for this CPU (its flags are in the cache key); the rest lets the compiler
# vectorise without changing results beyond float rounding (no finite-math assumptions: -inf is used)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
ENV = "SSB_ATTENTION_KERNEL"
OFF, ON = ("0", "off", "false", "no"), ("1", "on", "true", "yes")


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source: the CPU's instruction-set flags where readable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def build_dir() -> Path:
    from ssb.models import cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(CFLAGS).encode(), torch.__version__.encode(), sys.version.encode()):
        key.update(part)
    key.update(_cpu_signature().encode())
    return cache_dir() / "kernels" / f"decode_attention-{key.hexdigest()[:16]}"


def _ninja_on_path() -> None:
    """torch's JIT build runs `ninja` from PATH; the `ninja` package's binary may sit only in this venv's bin."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@contextlib.contextmanager
def build_lock(directory: Path):
    """Serialises kernel builds in `directory` across processes with an OS lock that is released when its holder
    dies. torch's own build lock is a `lock` file it creates and deletes; a process killed mid-build leaves it
    behind and every later build waits for it forever (2026-12-06: a test run hung on one for over an hour, `ssb
    run` for 20 minutes). Holding this lock, no other ssb process is building here, so a `lock` file found is
    stale: removed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's lock alone
        yield
        return
    with open(directory / "ssb-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load():
    """The compiled module, or None (the torch path) with the reason printed once. Raises when SSB_ATTENTION_KERNEL=1
    and the build fails."""
    raw = os.environ.get(ENV, "auto")
    want = raw.strip().lower()
    if want not in (*OFF, *ON, "auto", ""):
        raise ValueError(f"{ENV}={raw!r}: use 0 (torch attention), 1 (the kernel, or an error) or auto (the default)")
    if want in OFF:
        return None
    try:
        from torch.utils import cpp_extension

        _ninja_on_path()
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / "decode_attention.so").exists():
            print("[generation] compiling the decode-attention kernel (once per machine, about a minute)", flush=True)
        with build_lock(directory):
            module = cpp_extension.load(
                name="decode_attention",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                verbose=False,
            )
        wrong = self_check(module)
        if wrong:
            raise RuntimeError(f"the built kernel fails its self-check ({wrong})")
        return module
    except Exception as exc:  # noqa: BLE001 - any build failure means the torch path
        if want in ON:
            raise RuntimeError(f"{ENV}=1 but the decode-attention kernel did not build: {exc}") from exc
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"[generation] decode-attention kernel unavailable ({reason[:200]}); using the torch path", flush=True)
        return None


# the kernel's shape limits (csrc/decode_attention.cpp): other models use the torch path
MAX_GROUP, MAX_HEAD_DIM, LANES = 16, 256, 16


def for_model(device: torch.device, heads: int, kv_heads: int, head_dim: int):
    """The kernel module if decode for this model on `device` can use it (CPU, shapes within the kernel's limits;
    built on the first call), else None."""
    group = heads // kv_heads
    if device.type != "cpu" or group > MAX_GROUP or head_dim > MAX_HEAD_DIM or head_dim % LANES:
        return None
    return load()


def example_inputs(rows, kv, group, dim, layers, gen_len, prompt_len, seg, pseg, dtype, seed=0) -> dict:
    """The kernel's arguments, in order (a dict: pass `*d.values()`, then layer and scale): pools of `seg` /
    `pseg` positions filled at random, each row's slots scattered, random rotary angles. gen_len / prompt_len: per
    row, generated positions including this step's, and prompt positions."""
    g = torch.Generator().manual_seed(seed)
    gsegs, psegs = -(-max(gen_len) // seg), -(-max(prompt_len) // pseg)
    slots = rows + 3  # spare slots: a row's slot is not its index

    def pools(n, length):
        return [torch.randn(layers, slots, kv, length, dim, generator=g).to(dtype) for _ in range(n)]

    gen_k, gen_v, prompt_k, prompt_v = pools(gsegs, seg), pools(gsegs, seg), pools(psegs, pseg), pools(psegs, pseg)
    gen_slot = torch.stack([torch.randperm(slots, generator=g)[:rows] for _ in range(gsegs)], 1)
    prompt_slot = torch.stack([torch.randperm(slots, generator=g)[:rows] for _ in range(psegs)], 1)
    q = torch.randn(rows, kv, group, dim, generator=g).to(dtype)
    k_new, v_new = (torch.randn(rows, kv, dim, generator=g).to(dtype) for _ in range(2))
    angle = torch.rand(rows, dim // 2, generator=g).repeat(1, 2) * 6.3  # HF's layout: the two halves share angles
    return dict(
        q=q,
        k_new=k_new,
        v_new=v_new,
        cos=angle.cos().to(dtype),
        sin=angle.sin().to(dtype),
        gen_k=gen_k,
        gen_v=gen_v,
        gen_slot=gen_slot,
        gen_len=torch.tensor(gen_len),
        prompt_k=prompt_k,
        prompt_v=prompt_v,
        prompt_slot=prompt_slot,
        prompt_len=torch.tensor(prompt_len),
        order=torch.randperm(rows, generator=g),
    )


def rotated(x, cos, sin):
    """Hugging Face's rotary embedding (rotate-half) in float64, written out independently of the engine's.
    x: [R, heads, hd], cos/sin: [R, hd] -> [R, heads, hd]."""
    x, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def reference(args: dict, layer: int, scale: float) -> torch.Tensor:
    """What the kernel computes, by brute force in float64: each row's positions gathered from the pools (prompt,
    then generated, with this step's rotated key and its value at the last one), softmax attention of its
    rotated queries. Returns [R, KV, G, hd]."""
    r, kv, group, dim = args["q"].shape
    q = rotated(args["q"].reshape(r, kv * group, dim), args["cos"], args["sin"]).view(r, kv, group, dim)
    k_new = rotated(args["k_new"], args["cos"], args["sin"])
    out = torch.empty_like(q)
    seg, pseg = args["gen_k"][0].shape[3], args["prompt_k"][0].shape[3]
    for row in range(r):
        ks, vs = [], []
        n = int(args["prompt_len"][row])
        for j in range(-(-n // pseg)):
            s, w = int(args["prompt_slot"][row, j]), min(pseg, n - j * pseg)
            ks.append(args["prompt_k"][j][layer, s, :, :w])
            vs.append(args["prompt_v"][j][layer, s, :, :w])
        n = int(args["gen_len"][row])
        for j in range(-(-n // seg)):
            s, w = int(args["gen_slot"][row, j]), min(seg, n - j * seg)
            k, v = args["gen_k"][j][layer, s, :, :w].clone(), args["gen_v"][j][layer, s, :, :w].clone()
            if j == (n - 1) // seg:  # this step's position holds the new key and value
                k[:, w - 1], v[:, w - 1] = k_new[row].to(k.dtype), args["v_new"][row]
            ks.append(k)
            vs.append(v)
        k, v = torch.cat(ks, 1).double(), torch.cat(vs, 1).double()  # [KV, L, hd]
        p = torch.softmax(q[row] @ k.transpose(-1, -2) * scale, -1)  # [KV, G, L]
        out[row] = p @ v
    return out


def self_check(module) -> str | None:
    """Run the built kernel on small random caches for each code path it has (head_dim 64 and 128 are compiled
    for their size, bf16 on AVX512-BF16 CPUs has its own loops, other sizes share generic ones) and compare with
    `reference`. Returns what disagrees, or None. A compiler can mis-build vector code (GCC 12 once produced a
    no-op for an earlier version of the bf16 loops): the engine must then not use the kernel."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for dim in (32, 64, 128):
            args = example_inputs(3, 2, 3, dim, 2, [1, 9, 17], [5, 16, 1], 8, 16, dtype)
            scale = dim**-0.5
            got = module.decode_attention(*args.values(), 1, scale).double()
            err = (got - reference(args, 1, scale)).abs().max().item()
            if not err <= tol:  # also catches NaN
                return f"head_dim {dim}, {str(dtype).removeprefix('torch.')}: max error {err:.3g}"
    return None
