"""Plan and run an experiment: every arm under every seed, sharing what is valid to share, resumable.

Layout under the experiment directory OUT (default runs/experiments/<name>):

    OUT/experiment.yaml            the resolved spec (seeds included)
    OUT/seed-<s>/<arm>/            an ordinary run directory (`RunDir`) per seed and arm; its config.yaml is the
                                   arm's resolved config, its eval/<arm>/<eval set>/ the arm's evaluations
    OUT/shared/<arm>/eval/<set>/   a base arm's evaluation when eval is greedy (temperature 0): it does not
                                   depend on the seed, so it runs once for all seeds
    OUT/shared/difficulty/<set>/   with difficulty_samples: the base model sampled n times per problem
    OUT/stage-index/               which run directory finished which stage under which config and input hashes
    OUT/results.md, results.json, *.png   (`ssb.experiment.results`), rewritten after every seed

What is shared, and why it is valid:
- A stage whose config hash and input hashes equal those of a stage already finished in another arm of the same
  seed is copied from there (`RunDir(share=...)`, see `ssb.rundir`): the same test decides whether a stage reruns
  within one run directory. So SFT shares rollout, curate and teach with SSB, and arms that differ only in
  training share everything up to training.
- K sweep: an arm with rollout.k = k takes the first k of the K samples per question of a sibling arm whose config
  differs only in rollout.k (the largest such K). The engine draws each sample from its own seeded uniform stream
  keyed on (seed, prompt token ids, sample index) (`ssb.engine.sampling.sequence_uniforms`), so samples 0..k-1 of
  a K-sample run are the samples a K=k run draws, up to floating-point differences from batch composition.
- The base model's greedy evaluation (above).

Resume: rerun the same command. Every stage and evaluation resumes or skips by itself; a kill anywhere loses at
most the item in flight. Seeds run one after another, so an interrupted experiment already has complete seeds.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ssb.config import Config, config_hash, save_config
from ssb.experiment.results import write_results
from ssb.experiment.spec import (
    ArmRun,
    ExperimentSpec,
    arm_runs,
    budget_arm,
    difficulty_config,
    difficulty_dir,
    dump_spec,
    eval_dir,
    greedy,
)
from ssb.files import atomic_write_text, file_digest, read_jsonl, write_jsonl
from ssb.lifecycle import record_done, stage_hashes
from ssb.stages import PIPELINE, load

TRAINED = ("ssb", "sft")


def model_of(ar: ArmRun) -> str | None:
    """The model an arm evaluates: the base model, its LoRA adapter, or None when it produced none."""
    if ar.kind == "base":
        return ar.cfg.model
    path = ar.run.grpo_adapter if ar.kind == "grpo" else ar.run.adapter_dir
    return str(path) if (path / "adapter_config.json").exists() else None


# ---------------------------------------------------------------------------------------------- plan


def describe_plan(spec: ExperimentSpec, out: Path, seeds: list[int]) -> str:
    """What `ssb experiment` will do, in words (--dry-run)."""
    lines = [f"experiment {spec.name!r}: {len(spec.arms)} arms x {len(seeds)} seeds x {len(spec.eval)} eval sets"]
    lines.append(f"  output: {out}")
    lines.append(f"  eval sets: {', '.join(f'{e.name} ({e.data.source}, limit {e.data.limit})' for e in spec.eval)}")
    first = arm_runs(spec, out, seeds[0])
    for ar in first:
        what = {"base": "evaluate only", "grpo": "grpo"}.get(ar.kind, " -> ".join(PIPELINE))
        if ar.kind == "grpo" and ar.cfg.grpo.match_compute == "tokens":
            what += f" (max_steps set to match {budget_arm(spec)}'s tokens in the same seed)"
        over = " ".join(spec.arms[ar.arm].set) or "(experiment config)"
        lines.append(f"  arm {ar.arm} [{ar.kind}]: {what}; overrides: {over}")
        if ar.kind == "base" and greedy(ar.cfg):
            lines.append("    greedy eval: evaluated once for all seeds (the seed does not enter greedy decoding)")
    trained = sorted((ar for ar in first if ar.kind in TRAINED), key=lambda ar: -ar.cfg.rollout.k)  # run order
    for i, a in enumerate(trained):
        donor = _k_donor(a, trained)
        if donor is not None:
            lines.append(
                f"  {a.arm}: rollouts = the first {a.cfg.rollout.k} of {donor.cfg.rollout.k} samples of {donor.arm}"
            )
        for b in trained[:i]:
            same = [s for s in PIPELINE if _upstream_key(a.cfg, s) == _upstream_key(b.cfg, s)]
            if same:
                lines.append(f"  {a.arm}: {', '.join(same)} copied from {b.arm} (same config upstream)")
                break
    if spec.difficulty_samples:
        lines.append(
            f"  difficulty: the base model sampled {spec.difficulty_samples} times per problem of each eval set "
            "(once for all seeds); gains over base are split by it"
        )
    lines.append("  seeds run one after another; results are rewritten after each seed")
    return "\n".join(lines)


def _upstream_key(cfg: Config, name: str) -> str:
    """A plan-time key: the config sections that stage `name` and those before it depend on (equal keys within a
    seed mean equal inputs, hence shared outputs; the run itself decides by the exact hashes)."""
    from ssb.stages.logits import needs_stored_logits

    sections = {
        "rollout": (cfg.model, cfg.data, cfg.rollout, cfg.seed, cfg.generation_dtype, cfg.dtype),
        "curate": (cfg.curate,),
        "teach": (cfg.teach,),
        "logits": (cfg.logits, cfg.train.temperature, needs_stored_logits(cfg)),
        "train": (cfg.train,),
    }
    upto = PIPELINE[: PIPELINE.index(name) + 1]
    return config_hash(*[p for s in upto for p in sections[s]])


# ---------------------------------------------------------------------------------------------- K sweep


def _without_k(cfg: Config) -> str:
    from ssb.stages.rollout import rollout_parts

    return config_hash(*rollout_parts(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, k=1))))


def _k_donor(ar: ArmRun, arms: list[ArmRun]) -> ArmRun | None:
    """The sibling arm with the largest K > this arm's K whose rollout config differs only in K."""
    key = _without_k(ar.cfg)
    cands = [o for o in arms if o.cfg.rollout.k > ar.cfg.rollout.k and _without_k(o.cfg) == key]
    return max(cands, key=lambda o: o.cfg.rollout.k, default=None)


def derive_rollouts(ar: ArmRun, donor: ArmRun) -> bool:
    """Write the first k samples per question of the donor's finished rollouts as this arm's rollouts, and mark
    the rollout stage done under this arm's own config hash. False when the donor has not finished."""
    from ssb.stages.rollout import rollout_counts, rollout_parts

    entry = donor.run.stage_entry("rollout") or {}
    if entry.get("status") != "done" or not donor.run.rollouts.exists():
        return False
    source = file_digest(donor.run.rollouts)
    mine = ar.run.stage_entry("rollout") or {}
    chash, _ = stage_hashes(rollout_parts(ar.cfg), [])
    if mine.get("status") == "done" and mine.get("config_hash") == chash and mine.get("derived_from_digest") == source:
        return True  # derived earlier from the same donor rollouts
    k = ar.cfg.rollout.k
    records = [{**r, "rollouts": r["rollouts"][:k]} for r in read_jsonl(donor.run.rollouts)]
    ar.run.mkdir()
    write_jsonl(ar.run.train_data, read_jsonl(donor.run.train_data))
    write_jsonl(ar.run.rollouts, records)
    counts = rollout_counts(records)
    note = {"derived_from": str(donor.run.root), "derived_from_digest": source, "first_k": k}
    record_done(ar.run, "rollout", rollout_parts(ar.cfg), [], counts, **note)
    print(f"[rollout] {ar.arm}: the first {k} of {donor.cfg.rollout.k} samples per question of {donor.arm}", flush=True)
    return True


# ---------------------------------------------------------------------------------------------- running


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_seed(spec: ExperimentSpec, out: Path, seed: int) -> None:
    """Every arm of one seed: the SSB/SFT stages stage by stage across arms, GRPO, then every evaluation."""
    from ssb.stages.evaluate import evaluate

    arms = arm_runs(spec, out, seed)
    for ar in arms:
        ar.run.mkdir()
        save_config(ar.cfg, ar.run.config)
    trained = sorted((ar for ar in arms if ar.kind in TRAINED), key=lambda ar: -ar.cfg.rollout.k)
    empty: set[str] = set()
    for name in PIPELINE:
        for ar in trained:
            if ar.arm in empty:
                continue
            if name == "rollout":
                donor = _k_donor(ar, trained)
                if donor is not None and derive_rollouts(ar, donor):
                    continue
            _banner(f"seed {seed} / {ar.arm}: {name}")
            res = load(name)(ar.cfg, ar.run)
            if (name == "curate" and not res.get("kept")) or (name == "teach" and not res.get("pairs")):
                print(f"[experiment] seed {seed} / {ar.arm}: no training pairs; the arm has no model", flush=True)
                empty.add(ar.arm)
    budget_name = budget_arm(spec)
    budget = next((ar.run for ar in arms if ar.arm == budget_name), None)
    for ar in arms:
        if ar.kind == "grpo":  # after the SSB arms: a compute-matched GRPO arm reads the seed's SSB budget
            if ar.cfg.grpo.match_compute == "tokens" and budget_name in empty:
                print(
                    f"[experiment] seed {seed} / {ar.arm}: {budget_name} trained nothing, so there is no compute "
                    "budget to match; the arm has no model",
                    flush=True,
                )
                continue
            _banner(f"seed {seed} / {ar.arm}: grpo")
            load("grpo")(ar.cfg, ar.run, budget_run=budget)
    for ev in spec.eval:
        for ar in arms:
            model = model_of(ar)
            if model is None:
                continue
            ecfg = dataclasses.replace(ar.cfg, eval=dataclasses.replace(ar.cfg.eval, data=ev.data))
            if ar.kind == "base" and greedy(ar.cfg):
                ecfg = dataclasses.replace(ecfg, seed=0)  # unused by greedy decoding; fixed so all seeds share it
            _banner(f"seed {seed} / eval {ar.arm} on {ev.name}")
            evaluate(ecfg, model, None, eval_dir(out, ar, ev.name))
        if spec.difficulty_samples:  # once for all seeds: done after the first, skipped after the others
            dcfg = difficulty_config(spec, ev.data)
            _banner(f"difficulty of {ev.name}: the base model, {spec.difficulty_samples} samples per problem")
            evaluate(dcfg, dcfg.model, None, difficulty_dir(out, ev.name))


def check_eval_data(spec: ExperimentSpec) -> None:
    """Load every eval set once before any work: a missing local copy or an unreachable Hub dataset fails now,
    naming the set, not after an hour of training stages (as it did once, at the first GSM8K evaluation)."""
    from ssb.data import DataError, load_examples

    for ev in spec.eval:
        try:
            load_examples(ev.data)
        except DataError as e:
            raise DataError(f"{spec.source or spec.name}: eval set {ev.name!r}: {e}") from None


def run_experiment(spec: ExperimentSpec, out: Path, seeds: list[int], *, results_iters: int | None = None) -> dict:
    """Run (or resume) the whole experiment; rewrite the results after every seed. Returns the results."""
    check_eval_data(spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "experiment.yaml", dump_spec(spec, seeds))
    t0 = time.time()
    results: dict = {}
    for seed in seeds:
        _banner(f"experiment {spec.name}: seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})")
        run_seed(spec, out, seed)
        results = write_results(spec, out, seeds, iters=results_iters)
    print(f"[experiment] finished in {time.time() - t0:.0f} s; results: {out / 'results.md'}", flush=True)
    return results
