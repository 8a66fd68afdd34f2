"""Rollout -> curate -> teach on a tiny random model, through the CLI, including resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

from ssb.cli import main
from ssb.config import load_config
from ssb.files import read_jsonl, write_jsonl
from ssb.rundir import RunDir


def _data(tmp_path, n=6):
    f = tmp_path / "q.jsonl"
    f.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
            for i in range(n)
        )
    )
    return f


def _sets(model, data, **extra):
    base = {
        "model": str(model),
        "data.train.source": str(data),
        "rollout.k": 3,
        "rollout.max_new_tokens": 12,
        "rollout.batch_size": 4,
        "teach.max_new_tokens": 12,
        "teach.batch_size": 4,
    }
    base.update(extra)
    out = []
    for k, v in base.items():
        out += ["--set", f"{k}={v}"]
    return out


def test_rollout_records_and_skip(tmp_path, tiny_model_dir, capsys):
    data = _data(tmp_path)
    run = tmp_path / "run"
    assert main(["rollout", "--run-dir", str(run)] + _sets(tiny_model_dir, data)) == 0
    recs = read_jsonl(RunDir(run).rollouts)
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(6)]
    for r in recs:
        assert len(r["rollouts"]) == 3
        for x in r["rollouts"]:
            assert x["finish_reason"] in ("stop", "length") and 0 < x["num_tokens"] <= 12
            assert x["verdict"] in ("correct", "incorrect", "unparsed", "timeout")
            assert x["correct"] == (x["verdict"] == "correct")
    entry = RunDir(run).stage_entry("rollout")
    assert entry["status"] == "done" and entry["counts"]["rollouts"] == 18
    assert (run / "config.yaml").exists() and (run / "data" / "train.jsonl").exists()
    capsys.readouterr()
    assert main(["rollout", "--run-dir", str(run)]) == 0  # reuses the saved config: skipped
    assert "skipping" in capsys.readouterr().out
    assert main(["curate", "--run-dir", str(run)]) == 0
    assert RunDir(run).stage_entry("curate")["counts"]["questions"] == 6


def test_killed_rollout_resumes_without_duplicates(tmp_path, tiny_model_dir):
    data = _data(tmp_path, n=40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssb", "rollout", "--run-dir", str(run)] + _sets(
        tiny_model_dir, data, **{"rollout.batch_size": 2, "rollout.max_new_tokens": 24}
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = RunDir(run).rollouts
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(path, repair=False)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_jsonl(path, repair=False)
    assert 3 <= len(partial) < 40, "the kill should land mid-stage"
    assert RunDir(run).stage_entry("rollout")["status"] == "running"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout
    recs = read_jsonl(path)
    assert sorted(r["id"] for r in recs) == sorted(f"q{i}" for i in range(40))
    assert [r["id"] for r in recs[: len(partial)]] == [r["id"] for r in partial]  # kept, not redone
    assert RunDir(run).stage_entry("rollout")["status"] == "done"


def test_sigterm_mid_stage_ends_the_process_and_the_stage_resumes(tmp_path, tiny_model_dir):
    """`kill PID` (SIGTERM) mid-rollout ends ssb as SIGTERM would, saying so and recording the stage's time, and
    the rerun resumes (that its subprocesses are stopped first: test_rundir)."""
    data = _data(tmp_path, n=40)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssb", "rollout", "--run-dir", str(run)] + _sets(
        tiny_model_dir, data, **{"rollout.batch_size": 2, "rollout.max_new_tokens": 24}
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    path = RunDir(run).rollouts
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(path, repair=False)) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert "terminated (SIGTERM)" in err and "rerun the same command to resume" in err
    killed = RunDir(run).stage_entry("rollout")  # the time it spent is recorded, and counted again on resume
    assert killed["status"] == "failed" and killed["error"] == "terminated (SIGTERM)"
    assert killed["seconds"] > 0 and killed["cpu_seconds"] > 0
    assert 3 <= len(read_jsonl(path)) < 40
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr[-2000:]
    assert sorted(r["id"] for r in read_jsonl(path)) == sorted(f"q{i}" for i in range(40))
    assert RunDir(run).stage_entry("rollout")["cpu_seconds"] > killed["cpu_seconds"]


def test_teach_keeps_only_verified_solutions(tmp_path, tiny_model_dir):
    """Curated records are written by hand; golds are set to what the (deterministic, seeded) teacher will
    answer for half the questions, so exactly those become pairs."""
    from ssb.engine.engine import Engine, SamplingParams
    from ssb.models import load_model, load_tokenizer
    from ssb.prompts import load_template, student_messages, teacher_messages
    from ssb.stages.teach import teach
    from ssb.verify import extract_answer

    cfg = load_config(
        None,
        [
            "model=" + str(tiny_model_dir),
            "teach.max_new_tokens=16",
            "teach.batch_size=4",
            "teach.temperature=0",
            "generation_dtype=model",
        ],
    )  # the prediction below runs in the model's dtype
    run = RunDir(tmp_path / "run").mkdir()
    tmpl = load_template(None)
    curated = [
        {
            "id": f"q{i}",
            "question": f"Question {i}?",
            "gold": "?",
            "correct": f"it is {i}",
            "wrong": "x 1",
            "teacher_messages": teacher_messages(tmpl, f"Question {i}?", f"it is {i}", "x 1", "SYS"),
            "student_messages": student_messages(f"Question {i}?", "SYS"),
        }
        for i in range(6)
    ]
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    outs = Engine(model, tok, batch_size=4, progress=False).generate(
        [c["teacher_messages"] for c in curated], n=1, params=SamplingParams(temperature=0, max_new_tokens=16)
    )
    for i, c in enumerate(curated):
        got = extract_answer(outs[i][0].text).answer
        c["gold"] = got if (i % 2 == 0 and got is not None and outs[i][0].finish_reason == "stop") else "123456789"
    expected = {c["id"] for c in curated if c["gold"] != "123456789"}
    write_jsonl(run.curated, curated)
    counts = teach(cfg, run)
    pairs = read_jsonl(run.pairs)
    assert {p["id"] for p in pairs} == expected
    assert counts["pairs"] == len(expected) and counts["questions"] == 6
    assert len(read_jsonl(run.teach_attempts)) == 6
    for p in pairs:
        assert p["solution_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.decode(p["solution_ids"], skip_special_tokens=True).strip() == p["solution"].strip()
        assert p["student_messages"][1]["content"].startswith("Question")
