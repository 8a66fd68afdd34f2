"""`ssb run`: every stage in order, the baselines, then every model on the same held-out questions.

Order: rollout -> curate -> teach -> logits -> train (SSB), then the configured baselines (SFT on the same pairs,
GRPO on the same questions), optionally more SSB rounds, then evaluation of base, SSB (each round), SFT and GRPO,
and a comparison table with paired tests against the base model. Each stage skips itself when already finished
with the same config and inputs, so rerunning `ssb run` after a crash or a kill continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import time

from ssb import parallel
from ssb.compute import budget_lines
from ssb.config import Config, ConfigError
from ssb.files import read_jsonl, write_jsonl
from ssb.rundir import RunDir, benchmark_tag
from ssb.stages import PIPELINE, load
from ssb.stages.compare import compare, findings
from ssb.stages.evaluate import evaluate


def sft_config(cfg: Config) -> Config:
    """The SFT baseline: identical data and LoRA, cross-entropy on the solution tokens only."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kd_weight=0.0, ce_weight=1.0))


def round_config(cfg: Config, n: int, model: str) -> Config:
    """Round n (1-based) of iterated SSB: the previous student as model, the next slice of fresh questions."""
    if n == 1:
        return cfg
    spec = cfg.data.train
    data = dataclasses.replace(cfg.data, train=dataclasses.replace(spec, offset=spec.offset + (n - 1) * spec.limit))
    return dataclasses.replace(cfg, model=model, data=data, train=merge_if_more_rounds(cfg, n))


def merge_if_more_rounds(cfg: Config, n: int):
    """The next round's model is this round's merged student, so write it when another round follows."""
    return dataclasses.replace(cfg.train, merge=cfg.train.merge or cfg.rounds > n)


def ssb_round(cfg: Config, run: RunDir, force: bool) -> dict | None:
    """The five SSB stages; None when the data gave nothing to train on (the reason is printed)."""
    results = {}
    for name in PIPELINE:
        print(f"\n=== {name} ({run.root}) ===", flush=True)
        results[name] = load(name)(cfg, run, force=force)
        if name == "curate" and not results[name].get("kept") and cfg.teach.target_pairs is None:
            print(
                "[run] no question had both a correct and a wrong rollout: nothing to teach. Try more questions "
                "(data.train.limit), more rollouts (rollout.k) or easier data.",
                flush=True,
            )
            return None
        if name == "teach" and not results[name].get("pairs"):
            print("[run] the teacher produced no verified solution: nothing to train on.", flush=True)
            return None
    return results


def run_all(cfg: Config, run: RunDir, force: bool = False) -> dict:
    """`ssb run`: the SSB rounds, the baselines, then every model evaluated on the same held-out questions."""
    if cfg.rounds > 1 and cfg.data.train.source == "arith":  # a finite pool at level 1: fail now, not rounds later
        from ssb.data import load_examples

        try:
            load_examples(round_config(cfg, cfg.rounds, cfg.model).data.train)
        except ValueError as e:
            raise ConfigError(f"rounds={cfg.rounds} x data.train.limit={cfg.data.train.limit}: {e}") from None
    t0 = time.time()
    results: dict = {}
    models: list[tuple[str, str]] = [("base", cfg.model)]
    model = cfg.model
    for n in range(1, cfg.rounds + 1):
        rcfg = dataclasses.replace(round_config(cfg, n, model), train=merge_if_more_rounds(cfg, n))
        rrun = run if n == 1 else run.round_dir(n)
        res = ssb_round(rcfg, rrun, force)
        if res is None:
            break
        results[f"round{n}"] = res
        models.append(("ssb" if n == 1 else f"ssb-round{n}", str(rrun.adapter_dir)))
        model = str(rrun.merged_dir)
        if n == 1:
            results.update(baselines(cfg, run, force, models))
    if len(models) == 1:
        return results
    bench = benchmark_tag(cfg.eval.data.source)
    dirs = []
    for tag, spec in models:
        print(f"\n=== eval {tag} on held-out {bench} ===", flush=True)
        out = run.eval_dir(tag, bench)
        results[f"eval_{tag}"] = evaluate(cfg, spec, None, out, force=force)
        dirs.append(out)
    if not parallel.current().is_main:  # the table and findings come from rank 0 alone
        return results
    print(f"\n=== held-out {bench}: {', '.join(t for t, _ in models)} ===", flush=True)
    print(compare(dirs), flush=True)
    for line in budget_lines(run, cfg.train.epochs):  # the compute each arm spent (ssb.compute)
        print(line, flush=True)
    print("\n[run] what this run found:", flush=True)
    for line in findings({tag: d for (tag, _), d in zip(models, dirs)}):
        print(f"- {line}", flush=True)
    print(
        f"[run] finished in {time.time() - t0:.0f} s; run directory: {run.root}; report: ssb report {run.root}",
        flush=True,
    )
    return results


def baselines(cfg: Config, run: RunDir, force: bool, models: list) -> dict:
    """Train the configured baselines; append (tag, model spec) for each to `models`."""
    out = {}
    if "sft" in cfg.baselines:
        print("\n=== baseline: SFT on the same pairs ===", flush=True)
        sft_run = run.sft_run.mkdir()
        pairs = read_jsonl(run.pairs)
        if parallel.current().is_main and read_jsonl(sft_run.pairs) != pairs:
            write_jsonl(sft_run.pairs, pairs)
        parallel.barrier()
        out["sft"] = load("train")(sft_config(cfg), sft_run, force=force)
        models.append(("sft", str(sft_run.adapter_dir)))
    if "grpo" in cfg.baselines:
        print("\n=== baseline: GRPO on the same questions ===", flush=True)
        out["grpo"] = load("grpo")(cfg, run, force=force)
        models.append(("grpo", str(run.grpo_adapter)))
    if "dr_grpo" in cfg.baselines:
        from ssb.stages.grpo import dr_grpo_config

        print("\n=== baseline: Dr. GRPO on the same questions ===", flush=True)
        out["dr_grpo"] = load("grpo")(dr_grpo_config(cfg), run, force=force, name="dr_grpo")
        models.append(("dr_grpo", str(run.rl_adapter("dr_grpo"))))
    return out
