"""Compute accounting (ssb.compute): SSB's and the RL baselines' budgets from a handmade manifest, the matched
GRPO step count, the Dr. GRPO baseline trained by `grpo.match_compute: tokens` into RUN/dr_grpo, and the CPU
seconds a stage records (ssb.processes)."""

import subprocess
import sys
import time

import pytest

from ssb.compute import budget_lines, matched_grpo_steps, rl_budget, ssb_budget
from ssb.config import ConfigError, load_config
from ssb.files import write_jsonl
from ssb.lifecycle import stage
from ssb.processes import CPUTime
from ssb.rundir import RunDir


def _ssb_run(root) -> RunDir:
    run = RunDir(root).mkdir()
    for name, seconds, counts in (
        ("rollout", 100.0, {"tokens": 4000, "mean_tokens": 50.0}),
        ("curate", 1.0, {}),
        ("teach", 40.0, {}),
        ("logits", 5.0, {"mode": "offline", "tokens": 300}),
        ("train", 30.0, {"solution_tokens": 300}),
    ):
        run.update_stage(name, status="done", seconds=seconds, cpu_seconds=seconds / 2, counts=counts)
    write_jsonl(run.teach_attempts, [{"num_tokens": 200}, {"num_tokens": 150}])
    batch = run.batch_dir(1).mkdir()  # a further question batch (teach.target_pairs)
    batch.update_stage("rollout", status="done", seconds=50.0, counts={"tokens": 1000})
    write_jsonl(batch.teach_attempts, [{"num_tokens": 50}])
    return run


def test_ssb_and_grpo_budgets(tmp_path):
    run = _ssb_run(tmp_path)
    b = ssb_budget(run, epochs=3)
    assert (b["rollout_tokens"], b["teach_tokens"], b["generated_tokens"]) == (5000, 400, 5400)
    assert (b["forward_tokens"], b["trained_tokens"]) == (300, 900)
    assert b["tokens"] == 5400 + 300 + 900 and b["seconds"] == 176.0  # the batch's time is inside teach's
    assert b["cpu_seconds"] == 88.0
    assert rl_budget(run, "grpo") is None and budget_lines(run, 3)[0].startswith("[compute] SSB: 6,600 tokens")
    run.update_stage("grpo", status="done", seconds=88.0, counts={"generated_tokens": 1650, "steps": 4})
    g = rl_budget(run, "grpo")
    assert (g["tokens"], g["seconds"], g["cpu_seconds"]) == (3300, 88.0, None)
    lines = budget_lines(run, 3)
    assert lines[0].endswith("CPU 88 s")
    assert lines[1] == (  # a stage recorded before CPU seconds were: no CPU ratio rather than a wrong one
        "[compute] GRPO: 3,300 tokens (generated 1,650, trained 1,650; 4 steps), 88 s, CPU not recorded: 0.50x "
        "SSB's tokens, 0.50x its seconds"
    )
    run.update_stage("grpo", cpu_seconds=132.0)
    assert budget_lines(run, 3)[1].endswith(
        "88 s, CPU 132 s: 0.50x SSB's tokens, 0.50x its seconds, 1.50x its CPU seconds"
    )
    run.update_stage("logits", counts={"mode": "online"})  # the teacher scores every trained token
    assert ssb_budget(run, epochs=3)["forward_tokens"] == 900


def test_matched_grpo_steps(tmp_path):
    run = _ssb_run(tmp_path)
    cfg = load_config(None, ["grpo.batch_size=2", "grpo.num_generations=4", "grpo.max_completion_length=40"])
    steps, note = matched_grpo_steps(cfg, run)
    # 6,600 tokens / (2 x 2 questions x 4 completions x 40 tokens: the rollouts' mean 50 capped at 40)
    assert steps == round(6600 / (2 * 2 * 4 * 40)) == 10 and "max_steps = 10" in note
    with pytest.raises(ConfigError, match="grpo.match_compute.*finished in"):
        matched_grpo_steps(cfg, RunDir(tmp_path / "empty").mkdir())


def test_dr_grpo_baseline_in_its_own_directory_with_matched_compute(tmp_path, tiny_model_dir):
    from ssb.stages.grpo import dr_grpo_config, grpo

    run = _ssb_run(tmp_path / "run")
    cfg = load_config(
        overrides=[
            f"model={tiny_model_dir}",
            "data.train.limit=4",
            "grpo.num_generations=2",
            "grpo.batch_size=2",
            "grpo.max_completion_length=8",
            "grpo.match_compute=tokens",
            "train.lora_r=4",
            "train.lora_alpha=8",
            "train.epochs=3",
        ]
    )
    cfg = dr_grpo_config(cfg)
    assert (cfg.grpo.loss_type, cfg.grpo.scale_rewards) == ("dr_grpo", "none")
    # 6,600 tokens / (2 x 2 x 2 x 8) = 103 steps: too many for a test, so shrink SSB's budget to 2 steps' worth
    run.update_stage("rollout", counts={"tokens": 0, "mean_tokens": 8.0})
    run.update_stage("logits", counts={"mode": "offline", "tokens": 0})
    run.update_stage("train", counts={"solution_tokens": 0})
    write_jsonl(run.teach_attempts, [{"num_tokens": 128}])
    write_jsonl(run.batch_dir(1).teach_attempts, [])
    run.batch_dir(1).update_stage("rollout", counts={"tokens": 0})
    counts = grpo(cfg, run, name="dr_grpo")
    assert counts["steps"] == counts["max_steps"] == 2 and counts["loss_type"] == "dr_grpo"
    assert (run.root / "dr_grpo" / "adapter" / "adapter_config.json").exists()
    assert run.stage_entry("dr_grpo")["status"] == "done" and run.stage_entry("grpo") is None
    assert "Dr. GRPO" in budget_lines(run, 3)[-1]


def test_dr_grpo_is_a_known_baseline_and_others_are_not():
    assert load_config(None, ["baselines=[sft,grpo,dr_grpo]"]).baselines == ["sft", "grpo", "dr_grpo"]
    with pytest.raises(ConfigError, match="unknown baseline 'dapo'"):
        load_config(None, ["baselines=[dapo]"])


_SPIN = (
    "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
    "print('spun', flush=True)\ntime.sleep({sleep})"
)


def test_cpu_time_counts_subprocesses_live_or_reaped_and_not_idle_time():
    with CPUTime() as idle:
        time.sleep(0.5)
    assert idle.seconds < 0.2  # wall time is not CPU time
    with CPUTime() as live:  # a worker still running when the block ends (a vLLM engine, the verifier pool)
        child = subprocess.Popen([sys.executable, "-c", _SPIN.format(s=0.6, sleep=30)], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"spun\n"
    child.kill()
    child.wait()
    assert 0.55 <= live.seconds < 5  # /proc counts whole clock ticks: a 0.6 s spin can read 0.59
    with CPUTime() as reaped:  # a subprocess that exits inside the block
        subprocess.run([sys.executable, "-c", _SPIN.format(s=0.6, sleep=0)], check=True, capture_output=True)
    assert 0.55 <= reaped.seconds < 5


def test_stage_records_cpu_seconds_and_adds_an_interrupted_attempts_time(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        with stage(run, "s", ("x",), inputs=[], outputs=[]):
            t = time.process_time()
            while time.process_time() - t < 0.3:
                pass
            raise RuntimeError("interrupted")
    failed = run.stage_entry("s")
    assert failed["status"] == "failed" and failed["cpu_seconds"] >= 0.25  # clock ticks: 0.3 s read as 0.29
    with stage(run, "s", ("x",), inputs=[], outputs=[]) as st:
        assert st.resumed
        time.sleep(0.2)
    done = run.stage_entry("s")
    assert done["seconds"] >= failed["seconds"] + 0.2  # the resumed attempt kept the first attempt's records
    assert failed["cpu_seconds"] <= done["cpu_seconds"] < failed["cpu_seconds"] + 0.2
