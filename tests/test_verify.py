"""Answer equivalence, gold normalisation, timeouts and the `ssb verify` CLI.

Golds in the table are copied from GSM8K, MATH-500, AIME 2024 and AMC 2023 (the tests never read
the data files); predictions are answers as models write them.
"""

from __future__ import annotations

import json
import threading

import pytest

import ssb.verify.verifier as V
from ssb.verify import Verdict, Verifier, check, is_equivalent, normalize_gold
from ssb.verify.cli import verify_main

GSM8K_2125 = "Johnny picked up 500 + 1500+ 125= <<500+1500+125=2125>>2125 blocks\n#### 2,125"

# (pred, gold, expected verdict)
EQUIV = [
    # GSM8K: thousands separators, currency, units, decimals
    ("2125", GSM8K_2125, "correct"),
    ("2,125", "2125", "correct"),
    ("2,126", GSM8K_2125, "incorrect"),
    ("114,200", "114200", "correct"),
    ("$18", "18", "correct"),
    ("18.00", "18", "correct"),
    ("18.5", "18", "incorrect"),
    ("10001", "10000", "incorrect"),
    ("0.25", "25", "incorrect"),
    ("25\\%", "25", "correct"),
    ("0.25", "25\\%", "correct"),
    ("-5", "5", "incorrect"),
    # AIME zero padding, AMC floats
    ("25", "025", "correct"),
    ("73", "073", "correct"),
    ("80", "080", "correct"),
    ("8", "080", "incorrect"),
    ("27", "27.0", "correct"),
    ("3159", "3159.0", "correct"),
    ("-1", "-1.0", "correct"),
    ("1", "-1.0", "incorrect"),
    # MATH-500 fractions and radicals
    ("0.5", "\\frac12", "correct"),
    ("1/2", "\\dfrac{1}{2}", "correct"),
    ("\\frac{3}{4}", "\\frac 34", "correct"),
    ("0.34", "\\dfrac{33}{100}", "incorrect"),
    ("\\frac{639}{40}", "\\frac{639}{40}", "correct"),
    ("15.975", "\\frac{639}{40}", "correct"),
    ("-\\frac{24}{25}", "-\\frac{24}{25}", "correct"),
    ("\\frac{24}{25}", "-\\frac{24}{25}", "incorrect"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{\\sqrt{3}}{3}", "correct"),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", "correct"),
    ("\\sqrt{20}", "2\\sqrt{5}", "correct"),
    ("11\\sqrt{2}", "11\\sqrt2", "correct"),
    ("1.414214", "\\sqrt{2}", "correct"),
    ("1.41", "\\sqrt{2}", "incorrect"),
    ("\\frac{1}{3}", "0.3333", "incorrect"),
    ("137.5", "137 \\frac{1}{2}", "correct"),
    ("9/5", "1\\frac{4}{5}", "correct"),
    (".0000672", ".0000672", "correct"),
    ("0.0000672", ".0000672", "correct"),
    ("0.000067", ".0000672", "incorrect"),
    # exact values: math-verify's tolerance must not decide
    ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", "incorrect"),
    ("1/2^98", "1/2^99", "incorrect"),
    ("2*10^-20", "10^-20", "incorrect"),
    ("2 \\times 10^{-20}", "10^{-20}", "incorrect"),
    ("\\frac{1}{2004!}", "\\frac{1}{2006!}", "incorrect"),
    ("\\frac{x}{2^{98}}", "\\frac{x}{2^{99}}", "incorrect"),
    ("\\{2^{-98}, 3\\}", "\\{2^{-99}, 3\\}", "incorrect"),
    ("$1+\\frac{1}{\\mathrm{e}}$", "$1-\\frac{1}{\\mathrm{e}}$", "incorrect"),
    ("1+1/e", "1-1/e", "incorrect"),
    ("1-\\frac{1}{e}", "$1-\\frac{1}{\\mathrm{e}}$", "correct"),
    # sets of roots, \pm
    ("-2, 1", "1,-2", "correct"),
    ("1", "1,-2", "incorrect"),
    ("-2, 1+\\sqrt{5}, 1-\\sqrt{5}", "\\{1\\pm\\sqrt{5},-2\\}", "correct"),
    ("1+\\sqrt{5}, -2", "\\{1\\pm\\sqrt{5},-2\\}", "incorrect"),
    ("3+2\\sqrt{2}, 3-2\\sqrt{2}", "3 \\pm 2 \\sqrt{2}", "correct"),
    ("3+2\\sqrt{2}", "3 \\pm 2 \\sqrt{2}", "incorrect"),
    ("7, 5, 3", "3, 5, 7", "correct"),
    # intervals: open vs closed ends matter
    ("(-\\infty, 0]", "(-\\infty, 0]", "correct"),
    ("(-\\infty, 0)", "(-\\infty, 0]", "incorrect"),
    ("(3,4]", "(3,4]", "correct"),
    ("[3,4]", "(3,4]", "incorrect"),
    ("[-2,7]", "x \\in [-2,7]", "correct"),
    ("(2,\\infty)", "(5,\\infty)", "incorrect"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", "correct"),
    (
        "\\left[\\frac{\\pi^2}{8}, \\frac{5\\pi^2}{4}\\right]",
        "\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]",
        "correct",
    ),
    # points, vectors, matrices
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", "correct"),
    ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)", "incorrect"),
    (
        "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "correct",
    ),
    (
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 4/3 \\end{pmatrix}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "incorrect",
    ),
    (
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        "correct",
    ),
    # units, degrees, currency, base subscripts
    ("90", "90^\\circ", "correct"),
    ("90^\\circ", "90^\\circ", "correct"),
    ("75", "75^\\circ", "correct"),
    ("76", "75^\\circ", "incorrect"),
    ("15", "15\\mbox{ cm}^2", "correct"),
    ("864", "864 \\mbox{ inches}^2", "correct"),
    ("18.9", "\\$18.90", "correct"),
    ("32348", "\\$32,\\!348", "correct"),
    ("10080", "10,\\!080", "correct"),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", "correct"),
    ("5.4", "5.4 \\text{ cents}", "correct"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", "correct"),
    ("2516_8", "2516_8", "correct"),
    ("4343_5", "4343_6", "incorrect"),
    # choices, text, equations, expressions
    ("C", "\\text{(C)}", "correct"),
    ("(C)", "\\text{(C)}", "correct"),
    ("\\textbf{(C)}", "\\text{(C)}", "correct"),
    ("D", "\\text{(C)}", "incorrect"),
    ("Evelyn", "\\text{Evelyn}", "correct"),
    ("Navin", "\\text{Evelyn}", "incorrect"),
    ("x=5", "5", "correct"),
    ("5", "x=5", "correct"),
    ("x=6", "x=5", "incorrect"),
    ("y=2x+3", "y = 2x + 3", "correct"),
    ("y = 3 + 2x", "y = 2x + 3", "correct"),
    ("2(k+1)", "2k+2", "correct"),
    ("2k+1", "2k+2", "incorrect"),
    ("ab+2a+5b+10", "(a+5)(b+2)", "correct"),
    ("x^3+3x-6", "x^3+3x-6", "correct"),
    ("6-5i", "6 - 5i", "correct"),
    ("6+5i", "6 - 5i", "incorrect"),
    ("\\pi", "\\pi", "correct"),
    ("2 pi", "2\\pi", "correct"),
    ("2\\pi", "\\pi", "incorrect"),
    ("-\\frac{\\pi}{6}", "-\\frac{\\pi}{6}", "correct"),
    ("\\frac{\\pi}{6}", "-\\frac{\\pi}{6}", "incorrect"),
    # nothing usable
    ("", "5", "unparsed"),
    ("}{", "5", "unparsed"),
    ("no answer", "7", "unparsed"),
]


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout=10.0, workers=2) as v:
        yield v


@pytest.fixture(scope="module")
def equiv_results(verifier):
    return verifier.equivalent_many([(p, g) for p, g, _ in EQUIV])


def test_table_is_large_and_balanced():
    verdicts = [e for *_, e in EQUIV]
    assert len(EQUIV) >= 60
    assert verdicts.count("correct") >= 30 and verdicts.count("incorrect") >= 30


@pytest.mark.parametrize("i", range(len(EQUIV)), ids=[f"{p[:25]}|{g[-25:]}" for p, g, _ in EQUIV])
def test_equivalence_table(equiv_results, i):
    pred, gold, expected = EQUIV[i]
    assert equiv_results[i] == expected, (pred, gold)


def test_plain_numbers_never_start_the_pool(monkeypatch):
    monkeypatch.setattr(V, "_shared", None)
    assert is_equivalent("2,125", GSM8K_2125) == "correct"
    assert is_equivalent("$1,234.50", "1234.5") == "correct"
    assert is_equivalent("10001", "10000") == "incorrect"
    assert is_equivalent("\\frac{1}{2}", "0.5") == "correct"
    assert V._shared is None  # decided exactly in process, no worker started


@pytest.mark.parametrize(
    "raw, fmt, want",
    [
        (GSM8K_2125, "gsm8k", "2125"),
        ("Tom has 3.\n#### 72", "auto", "72"),
        ("#### -3", "gsm8k", "-3"),
        ("025", "aime", "25"),
        ("000", "aime", "0"),
        ("025", "auto", "25"),
        (27.0, "amc", "27"),
        (-1.0, "auto", "-1"),
        (0.5, "amc", "0.5"),
        ("27.0", "amc", "27"),
        (36, "auto", "36"),
        ("$1,-2$", "math", "1,-2"),
        ("\\boxed{\\frac{1}{2}}", "math", "\\frac{1}{2}"),
        ("$\\boxed{10,\\!080}$", "auto", "10,\\!080"),
        ("  \\text{(C)} ", "auto", "\\text{(C)}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "auto", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("2,125", "auto", "2125"),
        ("x=5", "plain", "x=5"),
    ],
)
def test_normalize_gold(raw, fmt, want):
    assert normalize_gold(raw, fmt) == want


@pytest.mark.parametrize(
    "raw, fmt, msg",
    [
        ("", "auto", "empty"),
        ("   ", "math", "empty"),
        ("no marker 42", "gsm8k", "no '#### N'"),
        ("#### many", "gsm8k", "not a number"),
        ("x", "aime", "not an integer"),
        ("27.0.1", "amc", "not a number"),
        ("$$", "math", "empty"),
        ("\\frac{1}{2", "math", "unbalanced"),
        (float("nan"), "amc", "finite"),
        (None, "auto", "string or number"),
        ("5", "latex", "unknown gold format"),
    ],
)
def test_normalize_gold_errors(raw, fmt, msg):
    with pytest.raises(ValueError, match=msg):
        normalize_gold(raw, fmt)


def test_unwrapped_set_gold_is_read_whole():
    # An unwrapped `1,-2` handed to math-verify parses as `1`; ours compares the whole set.
    assert is_equivalent("1", "1,-2") == "incorrect"
    assert is_equivalent("$1, -2$", "1,-2") == "correct"


def test_pathological_input_times_out_and_batch_goes_on():
    items = [
        ("5^{5^{5^5}}", "3"),
        ("\\frac{1}{2}", "0.5"),
        ("x=5", "5"),
        ("(3,4)", "(3,4]"),
        ("2\\sqrt{5}", "\\sqrt{20}"),
        ("42", "42"),
    ]
    with Verifier(timeout=2.0, workers=2) as v:
        got = v.equivalent_many(items)
        again = v.equivalent_many(items[1:])  # the pool is usable after a kill
        stats = v.stats
    assert got == ["timeout", "correct", "correct", "incorrect", "correct", "correct"]
    assert again == got[1:]
    assert stats["timeout"] == 1 and stats["worker_timeouts"] + stats["worker_crashes"] == 1


def test_works_from_a_non_main_thread(verifier):
    out = {}

    def work():
        out["many"] = verifier.check_many([("So $x = \\boxed{\\dfrac{1}{2}}$.", "0.5"), ("#### 7", "8")])
        out["one"] = is_equivalent("\\{3, 1\\}", "1, 3")

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert [v.verdict for v in out["many"]] == ["correct", "incorrect"]
    assert out["one"] == "correct"


def test_workers_started_in_a_finished_thread_survive():
    # Workers are started by a long-lived spawner thread: the parent-death signal is tied to the
    # starting thread, so a worker started by a caller's short-lived thread must not die with it.
    with Verifier(workers=1) as v:
        first = []
        t = threading.Thread(target=lambda: first.append(v.equivalent_many([("x=5", "5")])))
        t.start()
        t.join()
        assert first == [["correct"]]
        assert v.equivalent_many([("(3,4)", "(3,4]")]) == ["incorrect"]
        assert v.stats["worker_crashes"] == 0


def test_check_returns_full_verdict():
    v = check("Janet sells 9 eggs a day.\nShe makes 9 * 2 = $18 every day.\nThe answer is: $18.", GSM8K_2125)
    assert v == Verdict(extracted="18", rule="answer_is", verdict="incorrect", correct=False, policy="lenient")
    v = check("She makes 9 * 2 = 18 dollars.\n#### 18", "Janet...\n#### 18")
    assert v.to_dict() == {
        "extracted": "18",
        "rule": "hash",
        "verdict": "correct",
        "correct": True,
        "policy": "lenient",
    }
    v = check("She makes 18 dollars.", "18", policy="boxed")
    assert (v.extracted, v.rule, v.verdict, v.correct) == (None, None, "unparsed", False)
    with pytest.raises(ValueError, match="empty"):
        check("#### 5", "")


def test_check_many_keeps_order_and_policy(verifier):
    items = [
        ("\\boxed{3}", "3"),
        ("The answer is 4.", "3"),
        ("nothing to see", "3"),
        ("so it is \\boxed{\\{1,2\\}}", "2,1"),
    ]
    got = verifier.check_many(items, policy="boxed")
    assert [(v.extracted, v.verdict) for v in got] == [
        ("3", "correct"),
        (None, "unparsed"),
        (None, "unparsed"),
        ("\\{1,2\\}", "correct"),
    ]
    assert all(v.policy == "boxed" for v in got)
    with pytest.raises(ValueError, match="item 1: gold"):
        verifier.equivalent_many([("1", "1"), ("1", "")])


# ----------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "pred, gold, out, code",
    [
        ("42", "42", "correct", 0),
        ("The answer is 42 apples.", "42", "correct", 0),
        ("(3,4)", "(3,4]", "incorrect", 1),
        ("\\frac{1}{2}", "0.5", "correct", 0),
        ("Final answer: $\\boxed{2,125}$", GSM8K_2125, "correct", 0),
        ("I do not know", "5", "unparsed", 1),
        ("41", "42", "incorrect", 1),
    ],
)
def test_cli_single_pair(capsys, pred, gold, out, code):
    assert verify_main([pred, gold]) == code
    assert capsys.readouterr().out.strip() == out


def test_cli_single_pair_bad_gold_and_usage(capsys):
    assert verify_main(["5", ""]) == 2
    assert "gold" in capsys.readouterr().err
    assert verify_main(["5"]) == 2
    assert "PRED and GOLD are required" in capsys.readouterr().err


def test_cli_input_output_round_trip(tmp_path, capsys):
    rows = [
        {"id": 1, "pred": "Step 1...\nThe answer is 42 apples.", "gold": "42"},
        {"id": 2, "pred": "so $\\boxed{\\frac{1}{2}}$", "gold": "0.5", "policy": "boxed"},
        {"id": 3, "pred": "(3,4)", "gold": "(3,4]"},
        {"id": 4, "pred": "#### 2,125", "gold": GSM8K_2125},
        {"id": 5, "pred": "I am not sure.", "gold": "7"},
    ]
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out" / "g.jsonl"
    lines = [json.dumps(r) + "\n" for r in rows]
    inp.write_text("".join(lines[:3]) + "\n" + "".join(lines[3:]))  # a blank line is skipped
    assert verify_main(["--input", str(inp), "--output", str(outp), "--workers", "1"]) == 0
    out = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [o["id"] for o in out] == [1, 2, 3, 4, 5]
    assert [o["verdict"] for o in out] == ["correct", "correct", "incorrect", "correct", "unparsed"]
    assert [o["correct"] for o in out] == [True, True, False, True, False]
    assert [o["extracted"] for o in out] == ["42", "\\frac{1}{2}", "(3,4)", "2,125", "I am not sure"]
    assert [o["rule"] for o in out] == ["answer_is", "boxed", "whole", "hash", "whole"]
    assert out[1]["policy"] == "boxed" and out[0]["gold"] == "42"  # input fields kept as they were
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    counts = tuple(summary[k] for k in ("lines", "correct", "incorrect", "unparsed", "timeout"))
    assert counts == (5, 3, 1, 1, 0)
    assert summary["lines_per_s"] > 0
    assert [p.name for p in outp.parent.iterdir()] == ["g.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize(
    "bad, msg",
    [
        ('{"pred": "2"}', "missing field 'gold'"),
        ('{"gold": "2"}', "missing field 'pred'"),
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"pred": "2", "gold": ""}', "invalid field 'gold'"),
        ('{"pred": "2", "gold": "2", "policy": "x"}', "invalid field 'policy'"),
        ('{"pred": null, "gold": "2"}', "field 'pred' must be a string"),
    ],
)
def test_cli_malformed_line_names_file_and_line(tmp_path, capsys, bad, msg):
    inp, outp = tmp_path / "F.jsonl", tmp_path / "G.jsonl"
    inp.write_text('{"pred": "1", "gold": "1"}\n' + bad + "\n" + '{"pred": "3", "gold": "3"}\n')
    assert verify_main(["--input", str(inp), "--output", str(outp)]) == 2
    assert f"{inp}:2: {msg}" in capsys.readouterr().err
    assert not outp.exists()


def test_cli_skip_bad_records(tmp_path, capsys):
    inp, outp = tmp_path / "F.jsonl", tmp_path / "G.jsonl"
    inp.write_text('{"pred": "1", "gold": "1"}\n{"pred": "2"}\n{oops\n{"pred": "3", "gold": "4"}\n')
    assert verify_main(["--input", str(inp), "--output", str(outp), "--skip-bad-records"]) == 0
    out = [json.loads(x) for x in outp.read_text().splitlines()]
    assert [(o["pred"], o["verdict"]) for o in out] == [("1", "correct"), ("3", "incorrect")]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["lines"], summary["skipped"]) == (2, 2)


def test_cli_missing_input_file(tmp_path, capsys):
    assert verify_main(["--input", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
