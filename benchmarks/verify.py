"""Throughput and agreement of `ssb verify --input` on 10,000 realistic (pred, gold) lines.

Lines are built from real golds (GSM8K answer fields with `#### 2,125`, MATH-500 LaTeX, zero-padded
AIME, float AMC) when /work/shared/data exists, else from a synthetic list of the same forms. Each
pred is a short completion in one of the forms models write (`\\boxed{}`, `#### N`, "The answer is:
N.", a trailing number, a bare answer), either equal to its gold (an equivalent rewrite) or wrong (a
perturbed number or another question's gold); `agreement` is the share of verdicts that match
that construction. Two pathological lines (`5^{5^{5^5}}`) show that a hang costs at most --timeout.

The whole `--input` path runs end to end in a subprocess (read, extract, verify, write atomically).
Baseline, same run: the plain math-verify recipe (`parse` both sides, `verify`) in one process on
a sample of the same lines.

    python benchmarks/verify.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from bench_common import save_result  # noqa: E402

DATA = Path("/work/shared/data")
SYNTHETIC_MATH = [
    "\\frac{3}{4}",
    "2\\sqrt{5}",
    "(3,4]",
    "\\{1\\pm\\sqrt{5},-2\\}",
    "x=5",
    "\\text{(C)}",
    "90^\\circ",
    "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
    "\\frac{\\pi}{6}",
    "1,-2",
    "3 \\pm 2\\sqrt{2}",
    "\\$18.90",
    "10,\\!080",
    "x^2+2x+1",
    "-\\frac{24}{25}",
    "(2,\\infty)",
    "6 - 5i",
    "\\text{east}",
]


def load_golds(rng: random.Random) -> dict[str, list]:
    if DATA.exists():
        read = lambda name: [json.loads(x) for x in (DATA / name).read_text().splitlines() if x.strip()]  # noqa: E731
        return {
            "gsm8k": [r["answer"] for r in read("gsm8k_test.jsonl")],
            "math": [r["answer"] for r in read("math500_test.jsonl")],
            "aime": [r["answer"] for r in read("aime24_test.jsonl")],
            "amc": [r["answer"] for r in read("amc23_test.jsonl")],
        }
    ints = [rng.randint(1, 99999) for _ in range(500)]
    return {
        "gsm8k": [f"Work...\n#### {n:,}" for n in ints],
        "math": SYNTHETIC_MATH,
        "aime": [f"{rng.randint(0, 999):03d}" for _ in range(30)],
        "amc": [float(rng.randint(1, 500)) for _ in range(40)],
    }


def _bump(s: str, rng: random.Random) -> str | None:
    """A wrong answer: one digit changed (None if the answer has no digit)."""
    digits = [m.start() for m in re.finditer(r"\d", s)]
    if not digits:
        return None
    i = rng.choice(digits)
    return s[:i] + str((int(s[i]) + rng.randint(1, 8)) % 10) + s[i + 1 :]


def _dress(ans: str, rng: random.Random) -> str:
    """A completion ending in `ans`, in one of the forms small and large models write."""
    body = "Let's solve this step by step.\nFirst we compute the total, then we simplify.\n"
    plain = re.fullmatch(r"-?\d{1,3}(?:,\d{3})*(?:\.\d+)?|-?\d+(?:\.\d+)?", ans) is not None
    forms = ["boxed", "boxed", "hash", "answer_is", "bare"] + (["trailing", "answer_is_unit"] if plain else [])
    form = rng.choice(forms)
    return {
        "boxed": f"{body}So the final answer is $\\boxed{{{ans}}}$.",
        "hash": f"{body}#### {ans}",
        "answer_is": f"{body}The answer is: ${ans}$.",
        "answer_is_unit": f"{body}The answer is {ans} apples.",
        "trailing": f"{body}Therefore the result is {ans}",
        "bare": ans,
    }[form]


def make_lines(n: int, rng: random.Random) -> list[dict]:
    golds = load_golds(rng)
    lines = []
    for i in range(n):
        src = rng.choices(["gsm8k", "math", "aime", "amc"], weights=[50, 35, 7.5, 7.5])[0]
        gold = rng.choice(golds[src])
        answer = gold.rsplit("####", 1)[1].strip() if src == "gsm8k" else str(gold)
        if src == "aime":
            answer = str(int(answer))
        elif src == "amc":
            answer = str(int(gold)) if float(gold).is_integer() else str(gold)
        elif src == "math":
            answer = answer.replace("\\frac", "\\dfrac") if rng.random() < 0.3 else answer
        equal = rng.random() < 0.6
        if not equal:
            wrong = _bump(answer, rng) if rng.random() < 0.7 else None
            while wrong is None or wrong == answer:  # another question's gold, not this one's
                wrong = str(rng.choice(golds["math"]))
            answer = wrong
        lines.append({"id": i, "pred": _dress(answer, rng), "gold": gold, "expect": equal})
    for j in (n // 3, 2 * n // 3):  # pathological: must cost at most --timeout each
        lines[j] = {"id": j, "pred": "The answer is $5^{5^{5^5}}$.", "gold": "3", "expect": False}
    return lines


def baseline(lines: list[dict]) -> float:
    """Seconds for the plain math-verify recipe on `lines` (pathological lines excluded)."""
    from math_verify import parse, verify

    start = time.perf_counter()
    for rec in lines:
        gold = rec["gold"]
        gold = gold.rsplit("####", 1)[1].strip() if isinstance(gold, str) and "####" in gold else gold
        verify(parse(f"${gold}$"), parse(rec["pred"]))
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 lines instead of 10,000")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    rng = random.Random(0)
    n = 1_000 if args.quick else 10_000
    lines = make_lines(n, rng)
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        cmd = [
            sys.executable,
            "-c",
            "import sys; from ssb.verify.cli import verify_main; sys.exit(verify_main())",
            "--input",
            str(inp),
            "--output",
            str(outp),
            "--timeout",
            str(args.timeout),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        out = [json.loads(x) for x in outp.read_text().splitlines()]
    agree = sum(o["correct"] == o["expect"] for o in out)
    sample = [x for x in lines if "5^{5^" not in x["pred"]][: (100 if args.quick else 500)]
    base_s = baseline(sample)
    base_rate = len(sample) / base_s * 60
    rate = len(out) / seconds * 60
    result = {
        "benchmark": "verify",
        "lines": len(out),
        "seconds": round(seconds, 2),
        "lines_per_minute": round(rate),
        "counts": {k: summary[k] for k in ("correct", "incorrect", "unparsed", "timeout")},
        "pooled": summary["pooled"],
        "agreement": round(agree / len(out), 4),
        "disagreements": len(out) - agree,
        "data": "real" if DATA.exists() else "synthetic",
        "baseline": "math_verify parse+verify, one process",
        "baseline_lines": len(sample),
        "baseline_lines_per_minute": round(base_rate),
        "speedup": round(rate / base_rate, 2),
    }
    wrong = [o for o in out if o["correct"] != o["expect"]][:20]
    save_result("verify", {**result, "disagreement_examples": wrong})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
