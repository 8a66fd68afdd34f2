"""The eval stage: summary statistics on handmade samples, compare tables, end-to-end runs on the tiny model,
resuming after a kill, config mismatches and the CLI glue."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from ssb.config import EMBEDDED_MODEL, Config
from ssb.files import read_jsonl, write_jsonl
from ssb.metrics import wilson_ci
from ssb.stages import evaluate as ev
from ssb.stages.compare import compare, compare_main
from ssb.stages.evaluate import EvalError, evaluate
from ssb.summary import build_summary

Z95 = 1.959963984540054


def _rec(pid, samples, session=0, t=1.0):
    """samples: (extracted, correct, num_tokens, finish_reason) tuples."""
    ss = [
        {
            "text": f"... {x}",
            "extracted": x,
            "correct": ok,
            "num_tokens": nt,
            "finish_reason": fr,
            "verdict": "unparsed" if x is None else ("correct" if ok else "incorrect"),
            "rule": None,
        }
        for x, ok, nt, fr in samples
    ]
    return {
        "id": pid,
        "question": f"q{pid}",
        "gold": "g",
        "correct": sum(s["correct"] for s in ss),
        "samples": ss,
        "session": session,
        "t": t,
        "backend": "test",
    }


def test_summary_on_handmade_samples():
    s10 = (10, "stop")
    records = [
        _rec("p1", [("5", True, *s10), ("5", True, *s10), ("3", False, *s10), (None, False, *s10)], 0, 2.0),
        _rec("p2", [("7", False, *s10), ("2", True, *s10), ("2", True, *s10), ("7", False, *s10)], 0, 4.0),
        _rec("p3", [(None, False, 100, "length")] * 4, 1, 1.0),
        _rec("p4", [("9", True, *s10)] * 4, 1, 3.0),
    ]
    s = build_summary(records, {"model": "m", "benchmark": "b", "n": 4, "temperature": 0.8})
    assert (s["problems"], s["n"]) == (4, 4)
    assert s["pass@1"] == pytest.approx((0.5 + 0.5 + 0 + 1) / 4)
    # per problem 1 - C(4-c,k)/C(4,k): p1, p2 (c=2) 5/6 at k=2 and 1 at k>=3; p3 0; p4 1
    assert s["pass@k"]["2"] == pytest.approx((5 / 6 + 5 / 6 + 0 + 1) / 4)
    assert s["pass@k"]["3"] == s["pass@k"]["4"] == pytest.approx(0.75)
    assert s["pass@k"]["1"] == pytest.approx(s["pass@1"])
    # maj@4: p1 votes 5 (right); p2 ties 7/2 -> 7, the first seen (wrong); p3 no answer; p4 right
    assert s["maj@n"] == 0.5
    half = Z95 * math.sqrt(0.5 / 3) / 2  # normal CI over the per-problem shares [.5, .5, 0, 1]
    assert (s["pass@1_ci"]["low"], s["pass@1_ci"]["high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert s["pass@1_ci"]["method"].startswith("normal")
    assert s["verdicts"] == {"correct": 8, "incorrect": 3, "unparsed": 5, "timeout": 0}
    assert s["mean_tokens"] == pytest.approx((12 * 10 + 4 * 100) / 16)
    assert s["truncated_share"] == 0.25 and s["truncated_correct_share"] == 0.0
    assert (s["wall_seconds"], s["sessions"]) == (7.0, 2)  # max t per session, summed over sessions
    assert s["tokens_per_second"] == pytest.approx(520 / 7, abs=0.05)


def test_summary_counts_truncated_answers_that_were_judged_correct(tmp_path):
    records = [
        _rec("p1", [("4", True, 256, "length")]),
        _rec("p2", [("4", False, 256, "length")]),
        _rec("p3", [("4", True, 20, "stop")]),
        _rec("p4", [(None, False, 256, "length")]),
    ]
    s = build_summary(records, {"model": "m", "benchmark": "b", "n": 1, "temperature": 0.0})
    assert (s["truncated_share"], s["truncated_correct_share"]) == (0.75, 0.25)
    assert "75.0% truncated (25.0% truncated yet correct)" in ev.detail_line(s, tmp_path)


def test_summary_n1_uses_wilson_and_result_line():
    records = [_rec(f"p{i}", [(str(i), i < 3, 5, "stop")]) for i in range(10)]
    s = build_summary(records, {"model": "m", "benchmark": "arith", "n": 1, "temperature": 0.0})
    assert s["pass@1"] == pytest.approx(0.3) and s["maj@n"] == pytest.approx(0.3)
    assert (s["pass@1_ci"]["low"], s["pass@1_ci"]["high"]) == wilson_ci(3, 10)
    assert ev.result_line(s) == "pass@1 = 30.0% [95% CI 10.8–60.3] on 10 arith problems"
    # n > 1 with every problem scored the same: the normal CI would have zero width, Wilson is used instead
    same = [_rec(f"p{i}", [("1", False, 5, "stop")] * 2) for i in range(5)]
    s2 = build_summary(same, {"n": 2})
    assert s2["pass@1"] == 0.0 and s2["pass@1_ci"]["high"] == pytest.approx(wilson_ci(0, 5)[1])


def _write_eval_dir(d: Path, records: list[dict], n: int, benchmark: str = "arith") -> Path:
    d.mkdir(parents=True)
    write_jsonl(d / "samples.jsonl", records)
    summary = build_summary(records, {"model": d.name, "benchmark": benchmark, "n": n, "temperature": 0.0})
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_compare_pairs_runs_on_same_problems(tmp_path):
    ids = [f"q{i}" for i in range(10)]
    a = _write_eval_dir(tmp_path / "base", [_rec(q, [("1", i < 7, 10, "stop")]) for i, q in enumerate(ids)], 1)
    b = _write_eval_dir(
        tmp_path / "ssb", [_rec(q, [("1", i in (0, 1, 7), 20, "length")]) for i, q in enumerate(ids)], 1
    )
    c = _write_eval_dir(tmp_path / "other", [_rec(q, [("1", True, 5, "stop")]) for q in ids[:6] + ["x"]], 1)
    table = compare([a, b, c], iters=2000)
    rows = table.splitlines()
    assert rows[2].startswith("| 1 |") and "70.0% [39.7–89.2]" in rows[2] and "| 10 | 0.0% |" in rows[2]
    assert "30.0% [10.8–60.3]" in rows[3] and "| 20 | 100.0% |" in rows[3]
    assert rows[2].endswith("| 0.0% | 0.0% | 0.0% | 0.0% |")  # truncated, looping, wrong step, right yet wrong
    # A right / B wrong on q2..q6 (5), the reverse on q7 (1): McNemar exact p = 2 * (1 + 6) / 64
    pair = next(r for r in rows if r.startswith("| 1 | 2 |"))
    assert "| 10 | +40.0 pts |" in pair and f"| {2 * 7 / 64:.3g} | McNemar exact |" in pair
    assert "- 1 vs 3: not paired (different problem sets: 10 and 7 problems, 6 shared)" in rows
    assert compare([a], iters=10).count("\n") == 2  # a single run: just the table
    assert "Paired differences" not in compare([a, c], iters=10)  # nothing paired: no empty paired table


def test_compare_main_errors_on_missing_summary(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 2
    assert "summary.json: not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end

QUESTIONS = [
    ("a", "What is 3 + 4?", "7"),
    ("b", "What is 2 * 3?", "6"),
    ("c", "What is 9 - 5?", "4"),
    ("d", "What is 8 / 2?", "4"),
    ("e", "What is 1 + 1?", "2"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ssb.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "tiny_bench.jsonl"
    write_jsonl(path, [{"id": i, "question": q, "answer": a} for i, q, a in QUESTIONS])
    return path


def _cfg(n=2, temperature=1.0, max_new_tokens=6) -> Config:
    cfg = Config(device="cpu")
    cfg.eval.n, cfg.eval.temperature, cfg.eval.max_new_tokens, cfg.eval.batch_size = n, temperature, max_new_tokens, 4
    return cfg


def _count_prompts(monkeypatch) -> list[int]:
    from ssb.engine.engine import Engine

    calls, original = [], Engine.generate

    def counting(self, prompts, n, params, callback=None):
        calls.append(len(prompts))
        return original(self, prompts, n, params, callback=callback)

    monkeypatch.setattr(Engine, "generate", counting)
    return calls


def test_end_to_end_and_resume(tiny, bench, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    s = evaluate(_cfg(), str(tiny), None, out, data_file=str(bench))
    records = read_jsonl(out / "samples.jsonl")
    assert sorted(r["id"] for r in records) == ["a", "b", "c", "d", "e"]
    for r in records:
        assert len(r["samples"]) == 2 and r["gold"] == dict((i, a) for i, _, a in QUESTIONS)[r["id"]]
        assert all(1 <= x["num_tokens"] <= 6 and x["finish_reason"] in ("stop", "length") for x in r["samples"])
        assert r["correct"] == sum(x["correct"] for x in r["samples"])
    assert (s["problems"], s["n"], s["benchmark"]) == (5, 2, "tiny_bench")
    assert s["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 10)
    assert s["config"]["max_new_tokens"] == 6 and s["config"]["system_prompt"] == Config().rollout.system_prompt
    assert json.loads((out / "summary.json").read_text())["pass@1"] == s["pass@1"]
    assert "on 5 tiny_bench problems (n=2, T=1.0" in capsys.readouterr().out

    # a kill after two problems, mid-way through writing the third line
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    os.remove(out / "summary.json")
    calls = _count_prompts(monkeypatch)
    s2 = evaluate(_cfg(), str(tiny), None, out, data_file=str(bench))
    assert calls == [3]  # only the unfinished problems were generated
    resumed = {r["id"]: r for r in read_jsonl(out / "samples.jsonl")}
    assert len(resumed) == 5 and s2["sessions"] == 2
    for r in records:  # per-prompt seeded sampling: the resumed run drew the very same samples
        assert [x["text"] for x in resumed[r["id"]]["samples"]] == [x["text"] for x in r["samples"]]
    assert s2["pass@1"] == s["pass@1"]

    # finished: a rerun generates nothing and returns the stored summary
    assert evaluate(_cfg(), str(tiny), None, out, data_file=str(bench))["pass@1"] == s["pass@1"]
    assert calls == [3]

    # a different setup refuses to mix results, unless forced (old outputs are moved aside)
    with pytest.raises(EvalError, match="max_new_tokens: 6 -> 4"):
        evaluate(_cfg(max_new_tokens=4), str(tiny), None, out, data_file=str(bench))
    s3 = evaluate(_cfg(max_new_tokens=4), str(tiny), None, out, data_file=str(bench), force=True)
    assert calls == [3, 5] and s3["config"]["max_new_tokens"] == 4
    assert len(list(out.glob("samples.jsonl.stale-*"))) == 1


def test_correctness_counting_through_verifier(tiny, bench, tmp_path, monkeypatch):
    """A scripted engine (fixed completions) checks verdicts, maj@n and the prompt the model is shown."""
    import ssb.engine.engine as gen

    answers = {
        "What is 3 + 4?": ["So \\boxed{7}", "So \\boxed{7}"],  # both right
        "What is 2 * 3?": ["So \\boxed{5}", "So \\boxed{6}"],  # one right; tie -> 5 wins the vote
        "What is 9 - 5?": ["I do not know", "no idea"],  # unparsed
        "What is 8 / 2?": ["So \\boxed{4}", "So \\boxed{3}"],
        "What is 1 + 1?": ["So \\boxed{3}", "So \\boxed{3}"],
    }
    seen = []

    class ScriptedEngine:
        backend = "scripted"

        def __init__(self, model, tokenizer, **kw):
            pass

        def generate(self, prompts, n, params, callback=None):
            for i, msgs in enumerate(prompts):
                seen.append(msgs)
                texts = answers[msgs[-1]["content"]]
                callback(i, [gen.Completion(t, [1, 2], 2, "stop") for t in texts[:n]])

        def close(self):
            closed.append(True)

    closed = []
    monkeypatch.setattr(gen, "Engine", ScriptedEngine)
    cfg = _cfg(n=2)
    s = evaluate(cfg, str(tiny), None, tmp_path / "eval", data_file=str(bench))
    assert seen[0] == [
        {"role": "system", "content": cfg.rollout.system_prompt},
        {"role": "user", "content": "What is 3 + 4?"},
    ]
    assert s["pass@1"] == pytest.approx((2 + 1 + 0 + 1 + 0) / 10)
    assert s["pass@k"]["2"] == pytest.approx(3 / 5)
    assert s["maj@n"] == pytest.approx(2 / 5)  # a (7), d (tie 4/3 -> 4); b's tie goes to the wrong 5
    assert s["verdicts"]["unparsed"] == 2 and s["verdicts"]["correct"] == 4
    assert s["backend"] == "scripted" and closed == [True]  # the evaluation closed its generator


def test_eval_from_args_applies_options(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    ev.add_eval_args(parser)
    parser.add_argument("--run-dir")
    parser.add_argument("--force", action="store_true")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    calls = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, model, bench, out, **kw: calls.append((cfg, model, bench, out, kw)))
    args = parser.parse_args(
        [
            "--benchmark",
            "gsm8k",
            "--n",
            "4",
            "--temperature",
            "0.6",
            "--limit",
            "all",
            "--max-new-tokens",
            "128",
            "--policy",
            "boxed",
            "--run-dir",
            str(run),
        ]
    )
    assert ev.eval_from_args(Config(), args) == 0
    cfg, model, bench, out, kw = calls[0]
    assert (cfg.eval.n, cfg.eval.temperature, cfg.eval.max_new_tokens, cfg.eval.policy) == (4, 0.6, 128, "boxed")
    assert cfg.eval.data.limit is None and (model, bench) == (str(run / "adapter"), "gsm8k")
    assert out == run / "eval" / "ssb" / "gsm8k" and kw == {"data_file": None, "force": False}
    with pytest.raises(EvalError, match="--output-dir"):
        ev.eval_from_args(Config(), parser.parse_args(["--limit", "5"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "0"])


@pytest.mark.slow
def test_real_model_arith_smoke(tmp_path):
    model = os.environ.get("SSB_TEST_MODEL", EMBEDDED_MODEL)
    cfg = _cfg(n=1, temperature=0.0, max_new_tokens=256)
    cfg.eval.data.limit = 8
    s = evaluate(cfg, model, "arith", tmp_path / "eval")
    assert s["problems"] == 8 and s["verdicts"]["unparsed"] < 8  # the instruct model answers most questions


def test_summary_reports_wrong_steps_and_looping_and_reads_old_summaries(tmp_path):
    records = [_rec(f"p{i}", [("7", True, 10, "stop")]) for i in range(4)]
    texts = ["3 + 4 = 7, \\boxed{7}", "3 + 4 = 8, \\boxed{7}", "no steps", "7\n" * 12 + "7"]
    for r, text in zip(records, texts):
        r["samples"][0]["text"] = text
    records[3]["samples"][0].update(finish_reason="length", correct=False)
    s = build_summary(records, {"model": "m", "benchmark": "arith", "n": 1, "temperature": 0.0})
    assert (s["wrong_step_share"], s["correct_with_wrong_step_share"], s["looping_share"]) == (0.25, 0.25, 0.25)
    assert s["step_checked_share"] == 0.5
    line = ev.detail_line(s, tmp_path)
    assert "25.0% looping; 25.0% with a wrong arithmetic step (25.0% right answer yet a wrong step)" in line
    old = {k: v for k, v in s.items() if "step" not in k and "looping" not in k}  # a summary from before
    assert "looping" not in ev.detail_line(old, tmp_path) and "truncated" in ev.detail_line(old, tmp_path)


_SECOND_EVAL = """
import sys
sys.path.insert(0, {tests!r})
from test_evaluate import _cfg
from ssb.stages.evaluate import evaluate
evaluate(_cfg(), {model!r}, None, {out!r}, data_file={bench!r})
"""


def test_a_second_process_waits_for_an_evaluation_into_the_same_directory(tiny, bench, tmp_path):
    """Two processes evaluating into one directory (seeds of an experiment sharing the base model's greedy eval):
    the second waits on the directory's lock, then finds every problem done and generates nothing."""
    from pathlib import Path

    from ssb.files import directory_lock
    from ssb.testing import start_blocked

    out = tmp_path / "eval"
    evaluate(_cfg(), str(tiny), None, out, data_file=str(bench))
    before = (out / "samples.jsonl").read_text()
    code = _SECOND_EVAL.format(tests=str(Path(__file__).parent), model=str(tiny), out=str(out), bench=str(bench))
    log = tmp_path / "second.err"
    with directory_lock(out, "first"):
        second = start_blocked(code, log)
    stdout, _ = second.communicate(timeout=120)
    assert second.returncode == 0, log.read_text()
    assert f"[eval] another ssb process is evaluating into {out}; waiting" in log.read_text()
    assert "already done" in stdout
    assert (out / "samples.jsonl").read_text() == before
