"""The fused decode-attention kernel against plain softmax attention, and the engine with and without it."""

from __future__ import annotations

import pytest
import torch

from ssb.engine import attention_kernel
from ssb.engine.attention_kernel import example_inputs, reference, rotated
from ssb.engine.cache import _rope

kernel = attention_kernel.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the decode-attention kernel did not build here")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 64, 128])  # 64 and 128 are compiled for their size, others generically
def test_kernel_matches_softmax_attention_and_writes_the_step(dtype, dim):
    """Rows whose prompt and generated positions end inside, at the end of and just past a segment, one with a
    single prompt token; a prompt of 200 positions in one 256-position segment is scored in two chunks."""
    seg, pseg, layer, scale = 8, 16, 1, dim**-0.5
    gen_len, prompt_len = [1, 8, 9, 17, 23], [5, 16, 17, 40, 1]
    args = example_inputs(5, 2, 3, dim, 3, gen_len, prompt_len, seg, pseg, dtype)
    expected = reference(args, layer, scale)
    got = kernel.decode_attention(*args.values(), layer, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    k_new = rotated(args["k_new"], args["cos"], args["sin"])
    for r, n in enumerate(gen_len):  # the step's rotated K and its V landed at position n - 1 of the row's slot
        j, off = (n - 1) // seg, (n - 1) % seg
        slot = int(args["gen_slot"][r, j])
        torch.testing.assert_close(args["gen_k"][j][layer, slot, :, off].double(), k_new[r], atol=tol, rtol=tol)
        assert torch.equal(args["gen_v"][j][layer, slot, :, off], args["v_new"][r])


@needs_kernel
def test_kernel_result_does_not_depend_on_threads_or_order():
    args = example_inputs(6, 2, 2, 16, 1, [3, 9, 2, 30, 4, 1], [7, 3, 20, 2, 9, 12], 8, 8, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.decode_attention(*args.values(), 0, 0.25)
        torch.set_num_threads(max(2, threads))
        args["order"] = args["order"].flip(0)
        other = kernel.decode_attention(*args.values(), 0, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, other)


@needs_kernel
def test_a_prompt_longer_than_a_chunk():
    args = example_inputs(3, 1, 2, 16, 1, [2, 5, 1], [200, 129, 256], 8, 256, torch.float32)
    torch.testing.assert_close(
        kernel.decode_attention(*args.values(), 0, 0.25).double(), reference(args, 0, 0.25), atol=1e-5, rtol=1e-5
    )


def test_shapes_outside_the_kernel_and_the_environment_switch(monkeypatch):
    cpu = torch.device("cpu")
    assert attention_kernel.for_model(torch.device("meta"), 8, 2, 64) is None
    assert attention_kernel.for_model(cpu, 8, 2, 8) is None  # head_dim not a multiple of 16
    assert attention_kernel.for_model(cpu, 64, 2, 64) is None  # 32 query heads per kv head
    assert attention_kernel.for_model(cpu, 8, 2, 64) is kernel
    attention_kernel.load.cache_clear()
    monkeypatch.setenv(attention_kernel.ENV, "0")
    try:
        assert attention_kernel.load() is None
        monkeypatch.setenv(attention_kernel.ENV, "sometimes")
        attention_kernel.load.cache_clear()
        with pytest.raises(ValueError, match="SSB_ATTENTION_KERNEL='sometimes': use 0"):
            attention_kernel.load()
    finally:
        attention_kernel.load.cache_clear()


def test_reference_rotary_is_the_engines():
    x, angle = torch.randn(4, 3, 16), torch.rand(4, 8).repeat(1, 2)
    cos, sin = angle.cos(), angle.sin()
    engine = _rope(x[:, None], cos[:, None], sin[:, None])[:, 0]  # [B, T=1, heads, hd]
    torch.testing.assert_close(rotated(x, cos, sin), engine.double())


class _Broken:
    """A kernel module whose build went wrong: right shapes, wrong numbers."""

    @staticmethod
    def decode_attention(q, *args):
        return torch.zeros_like(q)


def test_a_miscompiled_kernel_is_refused_and_the_torch_path_used(monkeypatch, capsys):
    from torch.utils import cpp_extension

    assert "max error" in attention_kernel.self_check(_Broken())
    if kernel is not None:
        assert attention_kernel.self_check(kernel) is None
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: _Broken())
    attention_kernel.load.cache_clear()
    try:
        assert attention_kernel.load() is None
        assert "self-check" in capsys.readouterr().out
        monkeypatch.setenv(attention_kernel.ENV, "1")  # asked for the kernel: an error, not a silent fallback
        attention_kernel.load.cache_clear()
        with pytest.raises(RuntimeError, match="self-check"):
            attention_kernel.load()
    finally:
        attention_kernel.load.cache_clear()


def test_a_build_killed_midway_does_not_hang_the_next_one(tmp_path, monkeypatch):
    """torch's build lock is a file that a killed build leaves behind, and the next build waited on it forever
    (a test run hung for over an hour, `ssb run` for 20 minutes): the build now runs under an OS lock that dies with its
    holder, and under it a leftover `lock` file is removed. A stand-in build records what it found."""
    import fcntl

    from torch.utils import cpp_extension

    monkeypatch.setenv("SSB_CACHE", str(tmp_path))
    directory = attention_kernel.build_dir()
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # what a build killed midway leaves
    seen = {}

    def build(**kwargs):
        seen["stale lock"] = (directory / "lock").exists()
        with open(directory / "ssb-build.lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process would wait here
        seen["build dir"] = kwargs["build_directory"]
        return _Broken()

    monkeypatch.setattr(cpp_extension, "load", build)
    attention_kernel.load.cache_clear()
    try:
        assert attention_kernel.load() is None  # the stand-in fails its self-check: the torch path
    finally:
        attention_kernel.load.cache_clear()
    assert seen == {"stale lock": False, "build dir": str(directory)}
    with open(directory / "ssb-build.lock") as after:
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released once the build is over
