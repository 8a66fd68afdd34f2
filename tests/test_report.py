"""The report on a fake but structurally real run directory (manifest counts as the stages write them, metrics
lines as the trainers write them, summaries from the eval stage's own `build_summary`), and on incomplete runs."""

import html
import json

import pytest

from ssb.files import atomic_write_json, write_jsonl
from ssb.rundir import RunDir
from ssb.stages.report import report
from ssb.summary import build_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUESTION = "Is 3 < 5 & 7 > 2? <script>alert('x')</script> How many apples?"


def _eval_summary(run: RunDir, tag: str, bench: str, correct: list[bool], tokens: int, truncated: int = 0):
    samples = [
        [
            {
                "text": "...",
                "extracted": "1",
                "correct": ok,
                "num_tokens": tokens,
                "verdict": "correct" if ok else "incorrect",
                "rule": "boxed",
                "finish_reason": "length" if i < truncated else "stop",
            }
        ]
        for i, ok in enumerate(correct)
    ]
    records = [{"id": f"p{i}", "samples": s, "session": 0, "t": 2.0 + i} for i, s in enumerate(samples)]
    summary = build_summary(records, {"model": tag, "benchmark": bench, "n": 1, "temperature": 0.0})
    out = run.eval_dir(tag, bench)
    out.mkdir(parents=True)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _full_run(root) -> tuple[RunDir, dict]:
    run = RunDir(root).mkdir()
    run.update_stage(
        "rollout",
        status="done",
        seconds=61.5,
        cpu_seconds=110.0,
        counts={
            "questions": 20,
            "rollouts": 80,
            "correct": 36,
            "correct_share": 0.45,
            "unparsed": 6,
            "timeout": 0,
            "truncated": 3,
            "tokens": 12345,
            "mean_tokens": 154.3,
        },
    )
    run.update_stage(
        "curate",
        status="done",
        seconds=0.2,
        counts={"questions": 20, "mixed": 9, "all_correct": 5, "all_wrong": 4, "unparsed": 2, "kept": 9},
    )
    run.update_stage(
        "teach",
        status="done",
        seconds=30.0,
        counts={
            "questions": 9,
            "attempts": 9,
            "pairs": 7,
            "pass_rate_first_attempt": 7 / 9,
            "kept_share": 7 / 9,
            "truncated": 0,
            "solution_tokens": 900,
        },
    )
    run.update_stage(
        "train",
        status="done",
        seconds=300.0,
        counts={
            "pairs": 7,
            "dropped_too_long": 0,
            "solution_tokens": 900,
            "teacher": "stored",
            "steps": 6,
            "train_loss": 0.5,
        },
    )
    run.update_stage(
        "grpo",
        status="done",
        seconds=250.0,
        counts={
            "questions": 20,
            "steps": 4,
            "completions": 64,
            "generated_tokens": 4321,
            "seconds_training": 240.0,
            "train_loss": 0.01,
            "reward_first": 0.1,
            "reward_last": 0.4,
        },
    )
    write_jsonl(run.teach_attempts, [{"id": f"q{i}", "attempt": 0, "num_tokens": 111, "kept": i < 7} for i in range(9)])
    write_jsonl(
        run.metrics,
        [
            {
                "step": s,
                "epoch": s / 6,
                "loss": 1.0 / s,
                "kd": 0.9 / s,
                "ce": 2.0 - s / 10,
                "grad_norm": 0.3 * s,
                "lr": 2e-4,
                "completion_len": 120 + s,
            }
            for s in range(1, 7)
        ],
    )
    write_jsonl(
        run.root / "grpo" / "metrics.jsonl",
        [
            {
                "step": s,
                "loss": 0.01,
                "reward": 0.1 * s,
                "reward_std": 0.2,
                "kl": None,
                "grad_norm": 0.1,
                "completion_len": 90.0,
                "generated_tokens": 1000 * s,
            }
            for s in range(1, 5)
        ],
    )
    write_jsonl(
        run.curated,
        [
            {
                "id": "q0",
                "question": QUESTION,
                "gold": "12",
                "correct": "... \\boxed{12}",
                "correct_answer": "12",
                "wrong": "I get 13 & so \\boxed{13}",
                "wrong_answer": "13",
                "wrong_answer_count": 2,
            }
        ],
    )
    write_jsonl(
        run.pairs,
        [
            {
                "id": f"q{i}",
                "question": QUESTION if i == 0 else f"Question {i}?",
                "gold": "12",
                "solution": f"Step one: 5 + 7 = 12 <ok>. \\boxed{{12}} #{i}",
                "extracted": "12",
                "solution_ids": [1, 2, 3],
            }
            for i in range(4)
        ],
    )
    evals = {
        "base": _eval_summary(run, "base", "arith", [True] * 3 + [False] * 7, tokens=100, truncated=1),
        "ssb": _eval_summary(run, "ssb", "arith", [True] * 7 + [False] * 3, tokens=80),
    }
    return run, evals


def _pngs_ok(folder, names):
    for name in names:
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name


def test_report_of_a_full_run(tmp_path):
    run, evals = _full_run(tmp_path / "run1")
    page = report([run.root])
    assert page == run.report_dir / "report.html"
    text = page.read_text()
    # funnel row: questions, all correct, all wrong, unparsed, mixed, pairs, rollouts correct, teacher pass rate
    assert (
        "<tr><td>run1</td><td>20</td><td>5</td><td>4</td><td>2</td><td>9</td><td>7</td><td>45.0%</td>"
        "<td>77.8%</td></tr>"
    ) in text
    # eval rows with the CI from the summary
    for tag, s in evals.items():
        ci = s["pass@1_ci"]
        cell = f"{100 * s['pass@1']:.1f}% [{100 * ci['low']:.1f}–{100 * ci['high']:.1f}]"
        assert f"<td>{tag}</td><td>arith</td><td>1</td><td>10</td><td>{cell}</td>" in text
    assert "30.0% [" in text and "70.0% [" in text and "<td>10.0%</td>" in text  # base: 1 of 10 truncated
    # stage wall and CPU times (none recorded: a dash) and generated tokens (teach: 9 attempts x 111 tokens)
    assert "<td>rollout</td><td>done</td><td>61.5 s</td><td>110.0 s</td><td>12345</td>" in text
    assert "<td>teach</td><td>done</td><td>30.0 s</td><td>-</td><td>999</td>" in text
    assert "<td>grpo</td><td>done</td><td>4.2 min</td><td>-</td><td>4321</td>" in text
    assert "GRPO baseline: 4 steps, 64 completions, mean reward 0.1 at the first logged step and 0.4" in text
    # examples: escaped question, hint's wrong answer, teacher solution; nothing unescaped
    assert html.escape(QUESTION) in text and "<script>" not in text
    assert "Wrong answer shown in the hint:</b> 13" in text
    assert "5 + 7 = 12 &lt;ok&gt;." in text
    assert text.count("class='ex'") == 3
    assert text.count("data:image/png;base64,") == 4  # funnel, training, grpo, eval
    _pngs_ok(run.report_dir, ["funnel.png", "training.png", "grpo.png", "eval.png"])
    md = (run.report_dir / "report.md").read_text()
    assert "![SSB training dynamics](training.png)" in md
    assert "| run1 | 20 | 5 | 4 | 2 | 9 | 7 | 45.0% | 77.8% |" in md
    assert QUESTION in md  # verbatim inside a fenced block
    assert "| run1 | curate | done | 0.2 s | - | - |" in md


def test_report_of_unfinished_runs(tmp_path):
    empty = RunDir(tmp_path / "empty").mkdir()
    half = RunDir(tmp_path / "half").mkdir()
    half.update_stage(
        "rollout", status="done", seconds=5.0, counts={"questions": 12, "tokens": 500, "correct_share": 0.5}
    )
    half.update_stage("curate", status="failed", seconds=0.1, counts={})
    page = report([empty.root, half.root], output=tmp_path / "out")
    text = page.read_text()
    assert page == tmp_path / "out" / "report.html"
    assert "SSB training: not run" in text and "Evaluation: not run" in text
    assert "teacher solutions not run" in text
    assert "<tr><td>half</td><td>12</td><td>not run</td>" in text
    assert "<td>half</td><td>curate</td><td>failed</td>" in text
    assert "<td>empty</td><td>(no stage)</td><td>not run</td>" in text
    assert not (tmp_path / "out" / "training.png").exists()
    _pngs_ok(tmp_path / "out", ["funnel.png"])
    assert text.count("data:image/png;base64,") == 1


def test_report_compares_two_runs_and_checks_inputs(tmp_path):
    a, _ = _full_run(tmp_path / "a" / "run")
    b, _ = _full_run(tmp_path / "b" / "run")
    text = report([a.root, b.root]).read_text()
    # same directory names: labelled by path
    assert f"<td>{a.root}</td><td>ssb</td>" in text and f"<td>{b.root}</td><td>ssb</td>" in text
    with pytest.raises(FileNotFoundError, match="nowhere"):
        report([tmp_path / "nowhere"])
    bad = a.eval_dir("ssb", "arith") / "summary.json"
    s = json.loads(bad.read_text())
    del s["maj@n"]
    bad.write_text(json.dumps(s))
    with pytest.raises(ValueError, match=r"summary\.json: missing field 'maj@n'"):
        report([a.root])


def test_report_shows_completion_length_per_arm_quality_shares_and_compute(tmp_path):
    run, evals = _full_run(tmp_path / "run1")
    run.update_stage("logits", status="done", seconds=8.0, counts={"mode": "offline", "tokens": 900})
    teach = run.stage_entry("teach")["counts"]
    funnel = {"questions": 40, "mixed": 18, "teacher_attempts": 18, "verified": 15, "kept": 14, "pairs": 10}
    teach.update(funnel=funnel, target_pairs=10, target_reached=True, batches=2, shortfall_reason=None)
    run.update_stage("teach", counts=teach)
    text = report([run.root]).read_text()
    assert (
        "run1: yield 40 questions -&gt; 18 mixed -&gt; 18 teacher attempts -&gt; 15 verified -&gt; 14 kept -&gt; "
        "10 pairs; target 10 reached with 2 batches."
    ) in text
    # SSB: solution lengths 121..126 along training, 80 tokens at eval; GRPO: 90 and 90, not evaluated; base 100
    assert "<tr><td>run1</td><td>SSB</td><td>121</td><td>126</td><td>80</td></tr>" in text
    assert "<tr><td>run1</td><td>GRPO</td><td>90</td><td>90</td><td>-</td></tr>" in text
    assert "<tr><td>run1</td><td>base</td><td>-</td><td>-</td><td>100</td></tr>" in text
    # compute: 12,345 rollout + 999 teach + 900 teacher forward + 900 x 3 epochs trained; GRPO 2 x 4,321
    assert "run1: SSB: 16,944 tokens (generated 13,344 = rollout 12,345 + teach 999" in text
    assert (
        "run1: GRPO: 8,642 tokens (generated 4,321, trained 4,321; 4 steps), 250 s, CPU not recorded: "
        "0.51x SSB&#x27;s tokens" in text
    )
    # quality shares: measured by the step checker on the samples ('... 1' has no steps, none loops)
    assert "<td>10.0%</td><td>0.0%</td><td>0.0%</td><td>0.0%</td></tr>" in text
    # a summary from before the step checker: '-' in those columns
    path = run.eval_dir("ssb", "arith") / "summary.json"
    s = json.loads(path.read_text())
    for key in ("looping_share", "wrong_step_share", "correct_with_wrong_step_share"):
        del s[key]
    path.write_text(json.dumps(s))
    assert "<td>-</td><td>-</td><td>-</td></tr>" in report([run.root]).read_text()
