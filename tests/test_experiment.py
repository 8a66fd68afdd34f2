"""`ssb experiment` on a tiny model: arms x seeds, sharing (a shared stage runs once), the K subsample, resume
after a kill, the results table; and the crossed bootstrap against a brute-force enumeration of all resamples."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from ssb.config import ConfigError
from ssb.experiment.runner import run_experiment
from ssb.experiment.spec import load_spec
from ssb.files import read_jsonl
from ssb.metrics import Scores, crossed_bootstrap, paired_crossed_bootstrap, replicates
from ssb.rundir import RunDir

QUESTIONS = 6
EXPERIMENTS = Path(__file__).parents[1] / "configs" / "experiments"


def _experiment(tmp_path, model, arms: str, seeds: str = "[0, 1]", extra: str = "") -> object:
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples and {4 - i} more?", "answer": "4"}) + "\n"
            for i in range(QUESTIONS)
        )
    )
    base = tmp_path / "tiny.yaml"
    base.write_text(f"""
model: {model}
data: {{train: {{source: {data}}}}}
rollout: {{k: 4, max_new_tokens: 12, batch_size: 16}}
teach: {{max_new_tokens: 12, batch_size: 8, attempts: 2}}
logits: {{top_k: 8, batch_size: 4}}
train: {{epochs: 1, batch_size: 2, lora_r: 4, lora_alpha: 8, save_steps: 2}}
eval: {{data: {{source: {data}}}, max_new_tokens: 12}}
""")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: tiny\nconfig: {base.name}\nseeds: {seeds}\nbootstrap_iters: 500\n{extra}arms:\n{arms}")
    return load_spec(exp)


ARMS = """  base: {kind: base}
  ssb: {kind: ssb}
  sft: {kind: sft}
  k2: {kind: ssb, set: [rollout.k=2]}
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory, answering_model_dir):
    tmp = tmp_path_factory.mktemp("exp")
    spec = _experiment(tmp, answering_model_dir, ARMS, extra="difficulty_samples: 3\n")
    out = tmp / "out"
    res = run_experiment(spec, out, spec.seeds)
    return spec, out, res


def _stage(out, seed, arm, name):
    return RunDir(out / f"seed-{seed}" / arm).read_manifest()["stages"][name]


def test_arms_by_seeds_share_what_is_valid(finished):
    spec, out, res = finished
    for seed in (0, 1):
        ssb = str(out / f"seed-{seed}" / "ssb")
        # SFT reuses SSB's rollouts, curation and teacher solutions: copied, not rerun
        for name in ("rollout", "curate", "teach"):
            assert "shared_from" not in _stage(out, seed, "ssb", name)
            assert _stage(out, seed, "sft", name)["shared_from"] == ssb, name
        assert read_jsonl(out / f"seed-{seed}" / "sft" / "pairs.jsonl") == read_jsonl(
            out / f"seed-{seed}" / "ssb" / "pairs.jsonl"
        )
        assert "shared_from" not in _stage(out, seed, "sft", "train")  # different loss: trained separately
        # K = 2 takes the first 2 of SSB's 4 samples per question, then curates on its own
        assert _stage(out, seed, "k2", "rollout")["derived_from"] == ssb
        k2 = read_jsonl(out / f"seed-{seed}" / "k2" / "rollouts.jsonl")
        k4 = {r["id"]: r for r in read_jsonl(out / f"seed-{seed}" / "ssb" / "rollouts.jsonl")}
        assert all(r["rollouts"] == k4[r["id"]]["rollouts"][:2] for r in k2) and len(k2) == QUESTIONS
        assert "shared_from" not in _stage(out, seed, "k2", "curate")
    # the two seeds drew different rollouts (seed varies the sampling)
    texts = [
        [x["text"] for r in read_jsonl(out / f"seed-{s}" / "ssb" / "rollouts.jsonl") for x in r["rollouts"]]
        for s in (0, 1)
    ]
    assert texts[0] != texts[1]
    # greedy base eval: once for all seeds, in the shared directory
    assert not (out / "seed-0" / "base" / "eval").exists()
    assert len(read_jsonl(out / "shared" / "base" / "eval" / "q" / "samples.jsonl")) == QUESTIONS
    ev = res["eval"]["q"]
    assert ev["arms"]["base"]["per_seed"] == {0: ev["arms"]["base"]["pass@1"], 1: ev["arms"]["base"]["pass@1"]}
    for arm in ("ssb", "sft", "k2"):
        assert ev["arms"][arm]["seeds_done"] == [0, 1]
    pairs = {(p["a"], p["b"]) for p in ev["paired"]}
    assert {("ssb", "base"), ("sft", "base"), ("k2", "base"), ("sft", "ssb"), ("k2", "ssb")} <= pairs
    assert (out / "results.md").read_text().count("| ssb |") >= 1 and (out / "pass1.png").exists()
    summary = json.loads((out / "shared" / "base" / "eval" / "q" / "summary.json").read_text())
    assert ev["arms"]["base"]["looping_share"] == summary["looping_share"]  # reasoning checks per arm
    assert "| wrong step | right answer, wrong step |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    assert (
        "seeds: [0, 1]" in (out / "experiment.yaml").read_text().replace("\n- ", " ").replace("seeds:\n", "seeds: ")
        or (out / "experiment.yaml").exists()
    )


def test_gain_split_by_the_base_models_difficulty(finished):
    """The base model sampled 3 times per problem (once for both seeds) bins the problems; each arm's difference
    against base within a bin is the plain mean difference over that bin's problems and the seeds."""
    from ssb.experiment.results import difficulty_bins

    spec, out, res = finished
    samples = out / "shared" / "difficulty" / "q" / "samples.jsonl"
    records = read_jsonl(samples)
    assert len(records) == QUESTIONS and all(len(r["samples"]) == 3 for r in records)
    settings = json.loads((samples.parent / "eval_config.json").read_text())
    assert settings["temperature"] == 0.8 and settings["n"] == 3  # sampled as the rollouts are
    diff = res["eval"]["q"]["difficulty"]
    bins = difficulty_bins(samples)
    assert diff["problems"] == {b: sum(v == b for v in bins.values()) for b in ("never", "sometimes", "always")}
    base = {r["id"]: r["correct"] for r in read_jsonl(out / "shared" / "base" / "eval" / "q" / "samples.jsonl")}
    for row in diff["rows"]:
        ids = [i for i, b in bins.items() if b == row["bin"]]
        by_seed = []
        for seed in (0, 1):
            path = out / f"seed-{seed}" / row["arm"] / "eval" / row["arm"] / "q" / "samples.jsonl"
            arm = {r["id"]: r["correct"] for r in read_jsonl(path)}
            by_seed.append(sum(arm[i] - base[i] for i in ids) / len(ids))
        assert row["problems"] == len(ids)
        assert row["diff"] == pytest.approx(sum(by_seed) / 2)
        assert row["low"] <= row["diff"] <= row["high"]
    assert {r["arm"] for r in diff["rows"]} == {"ssb", "sft", "k2"}
    assert "Gain over base by the base model's difficulty" in (out / "results.md").read_text()


def test_compare_to_names_the_arms_others_are_paired_against(finished):
    """Default: every arm against base and against ssb; with compare_to, against exactly the arms named."""
    import dataclasses

    from ssb.experiment.results import collect

    spec, out, res = finished
    assert {p["b"] for p in res["eval"]["q"]["paired"]} == {"base", "ssb"}
    res = collect(dataclasses.replace(spec, compare_to=["k2"]), out, [0, 1], iters=200)
    paired = {(p["a"], p["b"]) for p in res["eval"]["q"]["paired"]}
    assert paired == {("base", "k2"), ("ssb", "k2"), ("sft", "k2")}
    from ssb.experiment.spec import budget_arm

    assert budget_arm(spec) == "ssb" and budget_arm(dataclasses.replace(spec, compare_to=["base", "k2"])) == "k2"


def test_k_subsample_equals_a_direct_k_run(finished, tmp_path):
    """The first k of K samples are the samples a K=k run draws (temperature 0.8 on the tiny model)."""
    from ssb.stages.rollout import rollout

    spec, out, _ = finished
    from ssb.experiment.spec import arm_config

    direct = RunDir(tmp_path / "direct")
    rollout(arm_config(spec, "k2", 0), direct)
    derived = read_jsonl(out / "seed-0" / "k2" / "rollouts.jsonl")
    assert [[x["text"] for x in r["rollouts"]] for r in read_jsonl(direct.rollouts)] == [
        [x["text"] for x in r["rollouts"]] for r in derived
    ]


def test_resume_after_a_kill_inside_a_stage(finished, tmp_path, monkeypatch):
    """A kill in the middle of the rollouts: the rerun finishes them without duplicates and gives the results of
    an uninterrupted run."""
    from ssb.verify import Verifier

    spec0, out0, res0 = finished
    spec = _experiment(tmp_path, spec0_model(spec0), ARMS, seeds="[0]")
    calls = {"n": 0}
    real = Verifier.check_many

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kill")
        return real(self, *a, **kw)

    monkeypatch.setattr(Verifier, "check_many", dying)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_experiment(spec, out, [0])
    assert len(read_jsonl(out / "seed-0" / "ssb" / "rollouts.jsonl")) == 2  # two questions saved before the kill
    monkeypatch.setattr(Verifier, "check_many", real)
    res = run_experiment(spec, out, [0])
    ids = [r["id"] for r in read_jsonl(out / "seed-0" / "ssb" / "rollouts.jsonl")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == QUESTIONS
    assert _stage(out, 0, "ssb", "rollout")["resumed"] is True
    for arm in ("ssb", "sft", "k2"):
        assert read_jsonl(out / "seed-0" / arm / "pairs.jsonl") == read_jsonl(out0 / "seed-0" / arm / "pairs.jsonl")
        assert res["eval"]["q"]["arms"][arm]["per_seed"][0] == res0["eval"]["q"]["arms"][arm]["per_seed"][0]


def test_grpo_arm_matches_the_ssb_arms_compute_seed_by_seed(tmp_path, answering_model_dir):
    """A GRPO arm with grpo.match_compute=tokens takes its step count from the same seed's SSB arm (its own run
    directory holds no SSB stages), and the results put every arm's compute beside the table."""
    from ssb.compute import matched_grpo_steps, ssb_budget
    from ssb.experiment.spec import arm_config

    grpo_set = "[grpo.match_compute=tokens, grpo.batch_size=2, grpo.num_generations=2, grpo.max_completion_length=8]"
    arms = f"  base: {{kind: base}}\n  ssb: {{kind: ssb}}\n  grpo: {{kind: grpo, set: {grpo_set}}}\n"
    spec = _experiment(tmp_path, answering_model_dir, arms, seeds="[0]")
    out = tmp_path / "out"
    res = run_experiment(spec, out, [0])
    ssb_run = RunDir(out / "seed-0" / "ssb")
    steps, _ = matched_grpo_steps(arm_config(spec, "grpo", 0), ssb_run)
    counts = _stage(out, 0, "grpo", "grpo")["counts"]
    assert counts["max_steps"] == steps and counts["steps"] == steps
    assert res["eval"]["q"]["arms"]["grpo"]["seeds_done"] == [0]
    budget = ssb_budget(ssb_run, arm_config(spec, "ssb", 0).train.epochs)
    assert res["compute"]["ssb"][0]["tokens"] == budget["tokens"] > 0
    assert res["compute"]["grpo"][0]["tokens"] == 2 * counts["generated_tokens"]
    assert res["compute"]["ssb"][0]["cpu_seconds"] > 0 and res["compute"]["grpo"][0]["cpu_seconds"] > 0
    table = (out / "results.md").read_text().split("## Compute per arm")[1]
    assert "| ssb | 1 |" in table and "| 1.00x | 1.00x | 1.00x |" in table and "| grpo | 1 |" in table
    # without an ssb arm there is no budget to match: refused when the spec loads, not after the stages
    bad = tmp_path / "exp.yaml"
    bad.write_text(bad.read_text().replace("  ssb: {kind: ssb}\n", ""))
    with pytest.raises(ConfigError, match=r"arm 'grpo': grpo.match_compute=tokens .* no arm of kind ssb"):
        load_spec(bad)


def test_funnel_counts_every_question_batch_of_a_pair_target(tmp_path):
    """With teach.target_pairs the run's own directory holds only the first batch's rollouts: the experiment's
    funnel adds the further batches (questions, mixed, rollouts correct weighted by questions)."""
    from ssb.experiment.results import _over_batches

    run = RunDir(tmp_path / "run").mkdir()
    run.update_stage("rollout", status="done", counts={"questions": 4, "correct_share": 0.5})
    for n, share in ((1, 0.25), (2, 0.0), (10, 0.25)):
        run.batch_dir(n).mkdir().update_stage("rollout", status="done", counts={"questions": 4, "correct_share": share})
    assert [b.root.name for b in run.batch_dirs()] == ["batch-1", "batch-2", "batch-10"]  # by number, not by text
    row = _over_batches(run, {"questions": 16, "mixed": 6})
    assert row == {"batches": 4, "rollout_correct_share": 0.25, "questions": 16, "mixed": 6, "mixed_share": 0.375}


def spec0_model(spec) -> str:
    from ssb.experiment.spec import base_config

    return base_config(spec).model


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiments_load(path):
    spec = load_spec(path)  # builds every arm's config too
    assert spec.name == path.stem and len(spec.seeds) >= 3 and "base" in spec.arms


def test_dry_run_shows_the_plan_and_what_is_shared(capsys):
    from ssb.experiment.cli import experiment_main

    assert experiment_main([str(EXPERIMENTS / "negative-context.yaml"), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "4 arms x 3 seeds x 1 eval sets" in plan
    assert "sft: rollout, curate, teach copied from ssb" in plan and "no-negative: rollout copied from ssb" in plan
    assert experiment_main([str(EXPERIMENTS / "k-sensitivity.yaml"), "--dry-run", "--seeds", "5,6"]) == 0
    plan = capsys.readouterr().out
    assert "6 arms x 2 seeds" in plan and "k2: rollouts = the first 2 of 10 samples of k10" in plan


def test_an_eval_set_that_cannot_load_fails_before_any_stage(tmp_path, monkeypatch):
    """A GSM8K eval set without the Hub or a local copy: the error names the experiment file, the eval set and
    SSB_DATA_DIR's expected file, before any run directory is written (it once came after an hour of stages)."""
    import datasets

    from ssb.data import DataError

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("SSB_DATA_DIR", raising=False)
    extra = "eval:\n  - {name: gsm8k, source: gsm8k, limit: 5}\n"
    spec = _experiment(tmp_path, "unused-model", "  ssb: {kind: ssb}\n", extra=extra)
    with pytest.raises(DataError) as e:
        run_experiment(spec, tmp_path / "out", [0])
    assert "exp.yaml: eval set 'gsm8k'" in str(e.value)
    assert "SSB_DATA_DIR to a folder holding gsm8k_test.jsonl" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: quick\narms: {ssb: {kind: ppo}}\n")
    with pytest.raises(ConfigError, match=r"arms.ssb.kind"):
        load_spec(bad)
    bad.write_text("preset: quick\narms: {ssb: {set: [train.nope=1]}}\n")
    with pytest.raises(ConfigError, match=r"arm 'ssb'.*train.nope"):
        load_spec(bad)
    bad.write_text("preset: quick\nseed: [0]\narms: {ssb: {}}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'seed'"):
        load_spec(bad)
    bad.write_text("preset: quick\ncompare_to: [base]\narms: {ssb: {}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'compare_to': 'base' is not an arm"):
        load_spec(bad)
    for value in ("1", "-2", "many"):  # one sample cannot tell 'sometimes' apart
        bad.write_text(f"preset: quick\ndifficulty_samples: {value}\narms: {{ssb: {{}}}}\n")
        with pytest.raises(ConfigError, match=r"bad.yaml: key 'difficulty_samples'"):
            load_spec(bad)


# ---------------------------------------------------------------------------------------------- the interval


def _brute_force(arms: list[Scores], seeds: list[int]) -> list[float]:
    """The statistic (difference when two arms) under every possible resample of seeds and clusters, each equally
    likely (ordered draws with replacement)."""
    ids = sorted(arms[0].by_seed[seeds[0]])
    clusters = sorted({arms[0].cluster[i] for i in ids})
    values = []
    for s_draw in itertools.product(seeds, repeat=len(seeds)):
        for c_draw in itertools.product(clusters, repeat=len(clusters)):
            stats = []
            for arm in arms:
                per_seed = []
                for s in s_draw:
                    xs = [arm.by_seed[s][i] for c in c_draw for i in ids if arm.cluster[i] == c]
                    per_seed.append(sum(xs) / len(xs))
                stats.append(sum(per_seed) / len(per_seed))
            values.append(stats[0] - stats[1] if len(stats) == 2 else stats[0])
    return values


def _inverse_cdf(values: np.ndarray, q: float) -> float:
    v = np.sort(values)
    return float(v[int(np.ceil(q * len(v))) - 1])


def test_crossed_bootstrap_matches_brute_force_enumeration():
    cluster = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}  # unequal cluster sizes: a ratio per seed
    x = Scores({0: {"a1": 1, "a2": 1, "b1": 0, "c1": 0}, 1: {"a1": 1, "a2": 0, "b1": 1, "c1": 0}}, cluster)
    y = Scores({0: {"a1": 0, "a2": 1, "b1": 0, "c1": 0}, 1: {"a1": 0, "a2": 0, "b1": 0, "c1": 1}}, cluster)
    iters = 100_000
    for arms, boot in (
        ([x], crossed_bootstrap(x, iters=iters, seed=1)),
        ([x, y], paired_crossed_bootstrap(x, y, iters=iters, seed=1)),
    ):
        exact = np.round(_brute_force(arms, [0, 1]), 9)  # 2^2 seed draws x 3^3 cluster draws = 108 resamples
        reps = replicates(arms, [0, 1], iters=iters, seed=1)
        sampled = np.round(reps[0] - reps[1] if len(reps) == 2 else reps[0], 9)
        support = np.unique(exact)
        assert set(np.unique(sampled)) <= set(support)  # no value a real resample cannot give
        exact_cdf = np.array([np.mean(exact <= v) for v in support])
        sampled_cdf = np.array([np.mean(sampled <= v) for v in support])
        assert np.max(np.abs(exact_cdf - sampled_cdf)) < 0.006  # same distribution (MC error ~0.0016)
        # the interval's ends are the exact distribution's 2.5% and 97.5% points (up to MC error in the level)
        assert _inverse_cdf(exact, 0.02) <= boot["low"] <= _inverse_cdf(exact, 0.03)
        assert _inverse_cdf(exact, 0.97) <= boot["high"] <= _inverse_cdf(exact, 0.98)
    # the point estimates are the plain means over seeds of the mean over problems
    assert crossed_bootstrap(x, iters=100)["mean"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert paired_crossed_bootstrap(x, y, iters=100)["diff"] == pytest.approx((2 / 4 - 1 / 4 + 2 / 4 - 1 / 4) / 2)


# ---------------------------------------------------------------------------------------------- `ssb run`'s sentences


def _eval_dir(path, correct: list[int], clusters: list[str] | None = None):
    from ssb.files import write_jsonl

    path.mkdir(parents=True)
    write_jsonl(
        path / "samples.jsonl",
        [
            {"id": f"p{i}", "cluster": clusters[i] if clusters else f"p{i}", "correct": c, "samples": [{"correct": c}]}
            for i, c in enumerate(correct)
        ],
    )
    return path


def test_run_ends_with_one_sentence_per_comparison(tmp_path):
    from ssb.stages.compare import findings

    clusters = [f"1+{i % 10}" for i in range(40)]  # arithmetic: 40 problems, 10 calculations
    base = _eval_dir(tmp_path / "base", [0] * 40, clusters)
    ssb = _eval_dir(tmp_path / "ssb", [1] * 30 + [0] * 10, clusters)  # 75 points better, everywhere
    sft = _eval_dir(tmp_path / "sft", [1, 0] + [0] * 38, clusters)  # one problem better
    grpo = _eval_dir(tmp_path / "grpo", [0] * 40, clusters)
    lines = findings({"base": base, "ssb": ssb, "sft": sft, "grpo": grpo}, iters=2000)
    assert len(lines) == 3
    assert lines[0].startswith("SSB vs base: +75.0 points, 95% CI [+")
    assert "(paired bootstrap over problems, resampled by calculation): SSB is better; one seed only;" in lines[0]
    assert lines[0].endswith("`ssb experiment configs/experiments/negative-context.yaml` measures it with 3 seeds.")
    assert lines[1].startswith("SFT vs base: +2.5 points, 95% CI [+0.0, +")  # never worse, so the interval starts at 0
    assert lines[2] == (
        "GRPO vs base: +0.0 points, 95% CI [+0.0, +0.0] (paired bootstrap over problems, resampled by calculation): "
        "not distinguishable at this size; `ssb experiment configs/experiments/baselines.yaml` measures it with 3 "
        "seeds."
    )


def test_a_small_difference_is_not_distinguishable(tmp_path):
    from ssb.stages.compare import findings

    base = _eval_dir(tmp_path / "base", [1, 0, 1, 0, 0, 1, 0, 0, 1, 0] * 3)
    ssb = _eval_dir(tmp_path / "ssb", [1, 1, 0, 0, 1, 1, 0, 0, 1, 0] * 3)
    (line,) = findings({"base": base, "ssb": ssb}, iters=2000)
    assert line.startswith("SSB vs base: +10.0 points, 95% CI [-")
    assert "(paired bootstrap over problems, resampled by problem): not distinguishable at this size; " in line
    assert line.endswith("`ssb experiment configs/experiments/negative-context.yaml` measures it with 3 seeds.")


def test_compute_table_with_cpu_seconds_from_some_seeds_only(tmp_path, tiny_model_dir):
    """Run directories from before CPU seconds were recorded: the CPU mean is over the seeds that have them (named),
    and the ratio to the ssb arm over the seeds both arms have."""
    from ssb.experiment.results import _compute_lines

    spec = _experiment(tmp_path, tiny_model_dir, "  base: {kind: base}\n  ssb: {kind: ssb}\n  grpo: {kind: grpo}\n")

    def row(tokens, seconds, cpu):
        halves = {"generated_tokens": tokens / 2, "trained_tokens": tokens / 4}
        return {"tokens": tokens, **halves, "seconds": seconds, "cpu_seconds": cpu}

    rows = {
        "ssb": {0: row(1000, 100, None), 1: row(1000, 300, 200), 2: row(1000, 100, 100)},
        "grpo": {0: row(900, 5000, None), 1: row(900, 600, 300), 2: row(900, 400, None)},
    }
    lines = _compute_lines(rows, spec)
    assert "| ssb | 3 | 1,000 | 500 | 250 | 167 | 150 (seeds 1, 2) | 1.00x | 1.00x | 1.00x |" in lines
    # grpo's CPU seconds: seed 1 only (300), against ssb's seed 1 (200)
    assert "| grpo | 3 | 900 | 450 | 225 | 2,000 | 300 (seed 1) | 0.90x | 12.00x | 1.50x |" in lines
    rows["grpo"] = {s: row(900, 400, 100) for s in (0, 1, 2)}
    assert "| grpo | 3 | 900 | 450 | 225 | 400 | 100 | 0.90x | 2.40x | 0.67x |" in _compute_lines(rows, spec)
