"""Where the built-in arithmetic problems sit for a model: per operation and operand size, the share of correct
rollouts and of "mixed" questions (at least one right and one wrong answer: the ones SSB can learn from).

    python benchmarks/arith_regime.py RUN_DIR

Reads RUN_DIR/config.yaml and RUN_DIR/rollouts.jsonl from an `ssb rollout` (or `ssb run`) on `source: arith`, and
regenerates the questions to recover each one's operation and operands (level 1; deeper levels get the overall
row only). Prints a table; writes benchmarks/results/arith_regime.json. No model is run: the rollouts are the
measurement, so the numbers are those of the run named.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from bench_common import save_result  # noqa: E402
from ssb.config import load_config  # noqa: E402
from ssb.data import arith  # noqa: E402
from ssb.files import read_jsonl  # noqa: E402
from ssb.rundir import RunDir  # noqa: E402

OPS = {"+": "addition", "-": "subtraction", "*": "multiplication", "/": "division"}


def operands(key: str) -> tuple[str, int]:
    """A level-1 key ('1-15,7') -> (operation, the larger of the two numbers the generator drew: the operands of +
    and x, the amount taken and the result of -, the divisor and the quotient of /)."""
    op, (a, b) = key[1], (int(x) for x in key[2:].split(","))
    numbers = {"+": (a, b), "-": (b, a - b), "*": (a, b), "/": (b, a // b)}[op]
    return op, max(numbers)


def size_bucket(n: int) -> str:
    return "<=5" if n <= 5 else "<=10" if n <= 10 else "<=20" if n <= 20 else ">20"


def regime(run: RunDir) -> tuple[int, list[dict]]:
    """A run directory -> (arith level, rows of group, questions, rollouts, correct_rollouts, mixed_questions).
    Raises ValueError, naming the file, when the run is not an arith rollout this generator can reproduce."""
    if not run.rollouts.exists():
        raise ValueError(f"{run.rollouts} does not exist: run `ssb rollout --run-dir {run.root}` first")
    spec = load_config(run.config).data.train
    if spec.source != "arith":
        raise ValueError(f"{run.config}: data.train.source is {spec.source!r}, not 'arith'")
    records = read_jsonl(run.rollouts)  # in completion order, so a partial file is not a prefix of the questions
    n_questions = len(read_jsonl(run.train_data))
    keys = {p.id: p.key for p in arith.generate(spec.split, spec.level, n_questions, offset=spec.offset)}
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # correct, rollouts, mixed, questions
    for r in records:
        if r["id"] not in keys:
            raise ValueError(
                f"{run.rollouts}: question {r['id']} is not among the regenerated arith problems "
                f"(was the run made with another version of the generator?)"
            )
        right = sum(x["correct"] is True for x in r["rollouts"])
        if spec.level == 1:
            op, biggest = operands(keys[r["id"]])
            names = ("all", OPS[op], f"numbers {size_bucket(biggest)}", f"{OPS[op]}, numbers {size_bucket(biggest)}")
        else:
            names = ("all",)
        for name in names:
            g = groups[name]
            g[0] += right
            g[1] += len(r["rollouts"])
            g[2] += 0 < right < len(r["rollouts"])
            g[3] += 1
    rows = [
        {"group": k, "questions": g[3], "rollouts": g[1], "correct_rollouts": g[0], "mixed_questions": g[2]}
        for k, g in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0]))
    ]
    return spec.level, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", help="a run directory holding config.yaml and rollouts.jsonl")
    args = ap.parse_args()
    run = RunDir(args.run_dir)
    try:
        level, rows = regime(run)
    except ValueError as e:
        ap.error(str(e))
    print(f"{'group':34s} {'questions':>9s} {'correct':>8s} {'mixed':>7s}")
    for row in rows:
        print(
            f"{row['group']:34s} {row['questions']:9d} {row['correct_rollouts'] / row['rollouts']:8.1%} "
            f"{row['mixed_questions'] / row['questions']:7.1%}"
        )
    save_result("arith_regime", {"run_dir": str(run.root), "level": level, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
