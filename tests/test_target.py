"""teach.target_pairs: further question batches until the run holds the target number of pairs, with the yield
funnel, on the tiny model that answers 4 (about 60%) or 5, so most questions are mixed and the teacher usually
verifies."""

import json

from ssb.config import load_config
from ssb.files import read_jsonl, write_jsonl
from ssb.rundir import RunDir
from ssb.stages.curate import curate
from ssb.stages.rollout import rollout
from ssb.stages.target import funnel_line
from ssb.stages.teach import teach


def _config(tmp_path, model, **sets):
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples and {4 - i} more?", "answer": "4"}) + "\n"
            for i in range(40)
        )
    )
    base = {
        "model": str(model),
        "data.train.source": str(data),
        "data.train.limit": 4,
        "rollout.k": 3,
        "rollout.max_new_tokens": 12,
        "rollout.batch_size": 12,
        "teach.max_new_tokens": 12,
        "teach.batch_size": 8,
        **sets,
    }
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _stages(cfg, run):
    rollout(cfg, run)
    curate(cfg, run)
    return teach(cfg, run)


def test_target_pairs_draws_fresh_batches_and_resumes_without_redoing(tmp_path, answering_model_dir, capsys):
    cfg = _config(tmp_path, answering_model_dir, **{"teach.target_pairs": 6, "teach.max_batches": 8})
    run = RunDir(tmp_path / "run").mkdir()
    counts = _stages(cfg, run)
    pairs = read_jsonl(run.pairs)
    assert len(pairs) == 6 and len({p["id"] for p in pairs}) == 6  # exactly the target, no duplicates
    assert counts["target_reached"] and counts["shortfall_reason"] is None and counts["pairs"] == 6
    n = counts["batches"]
    assert n >= 2 and all(run.batch_dir(i).pairs.exists() for i in range(1, n))
    # every batch took fresh questions: offset + i x limit
    seen = [r["id"] for b in [run] + [run.batch_dir(i) for i in range(1, n)] for r in read_jsonl(b.rollouts)]
    assert seen == [f"q{i}" for i in range(4 * n)]
    f = counts["funnel"]
    assert f["questions"] == 4 * n and f["mixed"] <= f["questions"]
    assert f["mixed"] <= f["teacher_attempts"] and f["kept"] <= f["verified"] <= f["teacher_attempts"]
    assert f["pairs"] == 6 <= f["kept"]
    out = capsys.readouterr().out
    assert f"-> {f['kept']} kept -> 6 pairs; target 6 reached with {n} batches" in out
    # a kill after the first further batch: the teach stage is still 'running' and pairs.jsonl holds less
    attempts_before = [len(read_jsonl(b.teach_attempts)) for b in [run] + [run.batch_dir(i) for i in range(1, n)]]
    first_batch = {p["id"] for p in read_jsonl(run.pairs) if p["id"] in {r["id"] for r in read_jsonl(run.rollouts)}}
    write_jsonl(run.pairs, [p for p in pairs if p["id"] in first_batch])
    run.update_stage("teach", status="running")
    again = teach(cfg, run)
    assert "resuming" in capsys.readouterr().out or not attempts_before[0]
    assert [p["id"] for p in read_jsonl(run.pairs)] == [p["id"] for p in pairs]  # the same pairs, in order
    assert again["funnel"] == f and again["batches"] == n
    after = [len(read_jsonl(b.teach_attempts)) for b in [run] + [run.batch_dir(i) for i in range(1, n)]]
    assert after == attempts_before  # nothing generated twice
    # a finished stage is skipped
    assert teach(cfg, run) == again


def test_target_not_reached_says_why(tmp_path, answering_model_dir, capsys):
    cfg = _config(tmp_path, answering_model_dir, **{"teach.target_pairs": 100, "teach.max_batches": 2})
    run = RunDir(tmp_path / "run").mkdir()
    counts = _stages(cfg, run)
    assert counts["batches"] == 2 and not counts["target_reached"]
    assert counts["shortfall_reason"] == "teach.max_batches = 2 batches of 4 questions drawn"
    assert counts["funnel"]["questions"] == 8
    assert "TARGET 100 NOT REACHED with 2 batches: teach.max_batches = 2" in capsys.readouterr().out


def test_without_a_target_the_funnel_is_reported_and_nothing_more_is_drawn(tmp_path, answering_model_dir):
    cfg = _config(tmp_path, answering_model_dir)
    run = RunDir(tmp_path / "run").mkdir()
    counts = _stages(cfg, run)
    assert "target_pairs" not in counts and not run.batches_dir.exists()
    assert counts["funnel"]["questions"] == 4 and counts["funnel"]["pairs"] == counts["pairs"]
    assert "target" not in funnel_line(counts)


def test_funnel_line_names_the_shortfall():
    counts = {
        "funnel": {"questions": 8, "mixed": 5, "teacher_attempts": 5, "verified": 3, "kept": 2, "pairs": 2},
        "target_pairs": 256,
        "target_reached": False,
        "batches": 2,
        "shortfall_reason": "no further training questions",
    }
    assert funnel_line(counts) == (
        "[teach] funnel: 8 questions -> 5 mixed -> 5 teacher attempts -> 3 verified -> 2 kept -> 2 pairs; TARGET 256 "
        "NOT REACHED with 2 batches: no further training questions (raise teach.max_batches or teach.attempts, or "
        "data.train.limit)"
    )


def test_further_batches_keep_one_generator_open_and_draw_the_same_records(tmp_path, answering_model_dir, monkeypatch):
    """The batches of a pair target share one generator for their rollouts and teaching (vLLM took about 20 s a
    start), closed when the stage ends, and give the records that a fresh generator per stage gives."""
    import contextlib

    import ssb.engine.backends as backends
    from ssb.engine.engine import Engine

    made = []
    real_init = Engine.__init__

    def counted(self, *args, **kwargs):
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", counted)
    cfg = _config(tmp_path, answering_model_dir, **{"teach.target_pairs": 6, "teach.max_batches": 8})

    def records(run: RunDir, n: int) -> list:
        dirs = [run] + [run.batch_dir(i) for i in range(1, n)]
        return [read_jsonl(path) for b in dirs for path in (b.rollouts, b.teach_attempts, b.pairs)]

    shared = RunDir(tmp_path / "shared").mkdir()
    n = _stages(cfg, shared)["batches"]
    assert n >= 2 and len(made) == 3  # the run's own rollout and teach, then one for every further batch
    assert all(e.model is None for e in made)  # all closed
    made.clear()
    monkeypatch.setattr(backends, "reusing_generators", contextlib.nullcontext)
    fresh = RunDir(tmp_path / "fresh").mkdir()
    assert _stages(cfg, fresh)["batches"] == n
    assert len(made) == 2 * n
    assert records(shared, n) == records(fresh, n)
