import json
import sys

import pytest

from ssb.files import JsonlWriter, atomic_write_json, read_jsonl
from ssb.lifecycle import stage
from ssb.rundir import RunDir


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    p = tmp_path / "x.jsonl"
    with JsonlWriter(p) as w:
        w.write({"a": 1})
        w.write({"a": 2})
    with open(p, "a") as f:
        f.write('{"a": 3, "b"')  # killed mid-write
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
    with JsonlWriter(p) as w:
        w.write({"a": 4})
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}, {"a": 4}]


def test_corruption_in_the_middle_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2"):
        read_jsonl(p)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"k": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def _run_stage(run, cfg_part, inp, out, force=False, fail=False):
    with stage(run, "s", (cfg_part,), inputs=[inp], outputs=[out], force=force) as st:
        if st is None:
            return "skipped"
        out.write_text(out.read_text() + "x" if out.exists() else "x")
        st.counts["n"] = 1
        if fail:
            raise RuntimeError("boom")
        return "resumed" if st.resumed else "ran"


def test_stage_skip_resume_and_invalidation(tmp_path):
    run = RunDir(tmp_path / "run")
    inp = tmp_path / "in.txt"
    inp.write_text("a")
    out = run.root / "out.txt"
    assert _run_stage(run, {"k": 1}, inp, out) == "ran"
    assert run.stage_entry("s")["status"] == "done"
    assert run.stage_entry("s")["counts"] == {"n": 1}
    assert _run_stage(run, {"k": 1}, inp, out) == "skipped"
    assert _run_stage(run, {"k": 1}, inp, out, force=True) == "ran"
    assert out.read_text() == "x"  # --force started over: the old output was moved aside, not appended to
    assert any(p.name.startswith("out.txt.stale-") for p in run.root.iterdir())
    inp.write_text("b")  # changed input: rerun from scratch
    assert _run_stage(run, {"k": 1}, inp, out) == "ran"
    with pytest.raises(RuntimeError):
        _run_stage(run, {"k": 2}, inp, out, fail=True)
    assert run.stage_entry("s")["status"] == "failed"
    assert _run_stage(run, {"k": 2}, inp, out) == "resumed"  # same config after a failure: continue
    assert out.read_text() == "xx"


_SECOND_PROCESS = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_rundir import _run_stage
from ssb.rundir import RunDir
tmp = Path({tmp!r})
print("second:", _run_stage(RunDir(tmp / "run"), {{"k": 1}}, tmp / "in.txt", tmp / "run" / "out.txt"))
"""


def test_a_second_process_waits_for_the_stage_then_skips_it(tmp_path):
    """Two processes on one run directory (two `ssb experiment --seeds` sharing the base evaluation): the second
    waits on the run directory's lock while the first works, then finds the stage done and skips it; nothing is
    appended twice."""
    from pathlib import Path

    from ssb.files import directory_lock
    from ssb.testing import start_blocked

    run = RunDir(tmp_path / "run")
    inp = tmp_path / "in.txt"
    inp.write_text("a")
    out = run.root / "out.txt"
    code = _SECOND_PROCESS.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))
    log = tmp_path / "second.err"
    with directory_lock(run.mkdir().root, "first"):
        with directory_lock(run.root, "first, nested"):  # re-entrant: a nested stage in the same process
            second = start_blocked(code, log)
        assert _run_stage(run, {"k": 1}, inp, out) == "ran"  # the first process's stage (lock re-entered)
    stdout, _ = second.communicate(timeout=120)
    assert second.returncode == 0, log.read_text()
    assert f"[s] another ssb process is working in {run.root}; waiting" in log.read_text()
    assert stdout.strip().endswith(
        "already done with the same config and inputs; skipping (--force reruns it)\nsecond: skipped"
    )
    assert out.read_text() == "x"


_PARENT = """
import subprocess, sys, time
from ssb.lifecycle import stop_subprocesses_on_sigterm
stop_subprocesses_on_sigterm()
# a child that ignores SIGTERM (as vLLM's engine does during its start-up), with a child of its own
code = "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
code += "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(g.pid, flush=True); "
code += "time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds subprocesses through /proc")
def test_sigterm_stops_every_subprocess_even_one_ignoring_it(tmp_path):
    import os
    import signal
    import subprocess
    import time

    from ssb.processes import running

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _PARENT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM and "2 subprocess(es) stopped" in proc.stderr.read()
    assert time.time() - t0 < 30
    time.sleep(0.5)  # the grandchild, orphaned by its parent's death, is reaped by init
    assert [p for p in pids if running(p)] == []
