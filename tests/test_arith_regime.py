"""benchmarks/arith_regime.py: the per-operation breakdown of a run's rollouts, on a run directory built here."""

import importlib.util
import sys
from pathlib import Path

import pytest

from ssb.config import load_config, save_config
from ssb.data import arith
from ssb.files import write_jsonl
from ssb.rundir import RunDir

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "arith_regime.py"


@pytest.fixture(scope="module")
def regime():
    sys.path.insert(0, str(SCRIPT.parent))  # as when run as a script: its folder's bench_common
    spec = importlib.util.spec_from_file_location("arith_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.regime


def _run(tmp_path, source="arith"):
    run = RunDir(tmp_path / "run").mkdir()
    save_config(load_config(None, ["data.train.limit=12", f"data.train.source={source}"]), run.config)
    probs = arith.generate("train", 1, 12)
    write_jsonl(run.train_data, [{"id": p.id, "question": p.question, "answer": str(p.answer)} for p in probs])
    # Question i gets i % 5 right answers out of 4 (4 of 4 for i % 5 == 4); written in reverse, as completion
    # order may be.
    write_jsonl(
        run.rollouts,
        [
            {"id": p.id, "rollouts": [{"correct": j < min(i % 5, 4)} for j in range(4)]}
            for i, p in reversed(list(enumerate(probs)))
        ],
    )
    return run, probs


def test_counts_by_operation_add_up(tmp_path, regime):
    run, probs = _run(tmp_path)
    level, rows = regime(run)
    by = {r["group"]: r for r in rows}
    right = [min(i % 5, 4) for i in range(12)]
    assert level == 1 and rows[0]["group"] == "all"
    assert by["all"] == {
        "group": "all",
        "questions": 12,
        "rollouts": 48,
        "correct_rollouts": sum(right),
        "mixed_questions": sum(0 < r < 4 for r in right),
    }
    ops = [r for r in rows if r["group"] in ("addition", "subtraction", "multiplication", "division")]
    assert sum(r["questions"] for r in ops) == 12 and sum(r["correct_rollouts"] for r in ops) == sum(right)
    for r in ops:
        symbol = {"addition": "+", "subtraction": "-", "multiplication": "*", "division": "/"}[r["group"]]
        assert r["questions"] == sum(p.key[1] == symbol for p in probs)


def test_bad_runs_get_errors_that_name_the_file(tmp_path, regime):
    run, _ = _run(tmp_path, source="gsm8k")
    with pytest.raises(ValueError, match=r"config.yaml: data.train.source is 'gsm8k', not 'arith'"):
        regime(run)
    run.rollouts.unlink()
    with pytest.raises(ValueError, match=r"rollouts.jsonl does not exist"):
        regime(run)
    run, _ = _run(tmp_path / "other")
    write_jsonl(run.rollouts, [{"id": "arith-l1-0000000000", "rollouts": []}])
    with pytest.raises(ValueError, match=r"rollouts.jsonl: question arith-l1-0000000000 is not among"):
        regime(run)
