"""`ssb run` end to end on a tiny model that answers 4 (about 60%) or 5: every stage does real work."""

import json

import pytest

from ssb.cli import main
from ssb.files import read_jsonl
from ssb.rundir import RunDir


def test_ssb_run_end_to_end_and_rerun_skips(tmp_path, answering_model_dir, capsys, monkeypatch):
    import ssb.engine.backends as backends

    made, make = [], backends.make_generator
    monkeypatch.setattr(backends, "make_generator", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples and {4 - i} more?", "answer": "4"}) + "\n"
            for i in range(8)
        )
    )
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {answering_model_dir}
data: {{train: {{source: {data}}}}}
rollout: {{k: 4, max_new_tokens: 16, batch_size: 16}}
teach: {{max_new_tokens: 16, batch_size: 8, attempts: 2}}
logits: {{top_k: 8, batch_size: 4}}
train: {{epochs: 2, batch_size: 2, lora_r: 4, lora_alpha: 8, save_steps: 2}}
eval: {{data: {{source: {data}}}, max_new_tokens: 16}}
grpo: {{max_steps: 1, batch_size: 2, num_generations: 2, max_completion_length: 8}}
baselines: [sft, grpo, dr_grpo]
""")
    run = RunDir(tmp_path / "run")
    assert main(["run", "--config", str(cfg), "--run-dir", str(run.root)]) == 0
    out = capsys.readouterr().out
    stages = run.read_manifest()["stages"]
    for name in ("rollout", "curate", "teach", "logits", "train", "grpo", "dr_grpo"):
        assert stages[name]["status"] == "done", name
    assert stages["dr_grpo"]["counts"]["loss_type"] == "dr_grpo"
    assert stages["curate"]["counts"]["kept"] >= 1
    pairs = read_jsonl(run.pairs)
    assert pairs and all("answer is 4" in p["solution"] for p in pairs)
    assert (run.adapter_dir / "adapter_config.json").exists()
    assert (run.sft_run.adapter_dir / "adapter_config.json").exists()
    assert read_jsonl(run.metrics) and read_jsonl(run.sft_run.metrics)
    table = out.split("=== held-out q:")[-1]
    for tag in ("base", "ssb", "sft", "grpo", "dr_grpo"):
        summary = json.loads((run.eval_dir(tag, "q") / "summary.json").read_text())
        samples = read_jsonl(run.eval_dir(tag, "q") / "samples.jsonl")
        assert summary["problems"] == len(samples) == 8
        assert summary["pass@1"] == pytest.approx(sum(s["correct"] for s in samples) / 8)
        assert f"| {run.eval_dir(tag, 'q')} |" in table  # every model is a row of the final comparison
    assert "[compute] SSB: " in out and "[compute] GRPO: " in out and "[compute] Dr. GRPO: " in out
    # every generator a stage opened (rollout, teach, 5 evals) was closed when it finished (a vLLM engine left
    # to the garbage collector outlived its stage)
    assert len(made) >= 7 and all(g.model is None for g in made)
    # A rerun skips every finished stage.
    assert main(["run", "--config", str(cfg), "--run-dir", str(run.root)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipping") >= 6


def test_iterated_rounds_train_on_fresh_questions_from_the_merged_student(tmp_path, answering_model_dir, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples?", "answer": "4"}) + "\n" for i in range(8))
    )
    cfg = tmp_path / "rounds.yaml"
    cfg.write_text(f"""
model: {answering_model_dir}
rounds: 2
baselines: []
data: {{train: {{source: {data}, limit: 4}}}}
rollout: {{k: 4, max_new_tokens: 16, batch_size: 16}}
teach: {{max_new_tokens: 16, batch_size: 8, attempts: 2}}
logits: {{top_k: 8, batch_size: 4}}
train: {{epochs: 1, batch_size: 2, lora_r: 4, lora_alpha: 8}}
eval: {{data: {{source: {data}, limit: 4}}, max_new_tokens: 16}}
""")
    run = RunDir(tmp_path / "run")
    assert main(["run", "--config", str(cfg), "--run-dir", str(run.root)]) == 0
    r2 = run.round_dir(2)
    first = {r["id"] for r in read_jsonl(run.rollouts)}
    second = {r["id"] for r in read_jsonl(r2.rollouts)}
    assert first == {"q0", "q1", "q2", "q3"} and second == {"q4", "q5", "q6", "q7"}  # fresh questions
    assert (run.merged_dir / "config.json").exists()  # round 1's merged student is round 2's model
    assert json.loads((r2.adapter_dir / "ssb_base.json").read_text())["model"] == str(run.merged_dir)
    assert (r2.adapter_dir / "adapter_config.json").exists()
    for tag in ("base", "ssb", "ssb-round2"):  # every round evaluated
        assert json.loads((run.eval_dir(tag, "q") / "summary.json").read_text())["problems"] == 4


def test_rounds_beyond_the_arith_pool_fail_before_any_stage_runs(tmp_path, capsys, monkeypatch):
    from ssb.data import arith

    monkeypatch.setattr(arith, "_level1", lambda rng: ("Q", "1+2,2", 4, ""))  # a pool of one problem
    monkeypatch.setattr(arith, "_split_of", lambda key: "train")
    run = RunDir(tmp_path / "run")
    args = ["run", "--run-dir", str(run.root), "--set", "rounds=2", "--set", "data.train.limit=1"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "rounds=2 x data.train.limit=1" in err and "holds only 1 distinct train problems" in err
    assert not run.rollouts.exists()
