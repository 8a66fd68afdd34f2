"""The experiment spec: arms x seeds x eval sets, declared in one YAML file (`ssb experiment CONFIG.yaml`).

    name: negative-context
    preset: quick                     # or `config: path.yaml` (relative to this file)
    set: [data.train.limit=64]        # overrides for every arm
    seeds: [0, 1, 2]
    eval:                             # default: the base config's eval.data
      - {name: arith-l1, source: arith, split: test, level: 1, limit: 100}
    arms:
      base: {kind: base}
      ssb: {kind: ssb}
      no-negative: {kind: ssb, set: [curate.negative=false]}

Each field below carries its documentation in `metadata["help"]`. Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from ssb.config import Config, ConfigError, DatasetSpec, load_config, read_yaml
from ssb.config.loading import _build as build_dataclass  # typed build from a mapping, errors name the key
from ssb.config.schema import opt
from ssb.rundir import RunDir

KINDS = ("base", "ssb", "sft", "grpo")


@dataclass
class ArmSpec:
    kind: Literal["base", "ssb", "sft", "grpo"] = opt(
        "ssb",
        "base: the model as is (evaluated only); ssb: rollout -> curate -> teach -> logits -> train (KL); sft: the "
        "same stages with cross-entropy on the solutions (train.kd_weight=0, ce_weight=1); grpo: the GRPO baseline",
    )
    set: list[str] = opt([], "Config overrides for this arm only (key.sub=value), applied after the experiment's")


@dataclass
class EvalSetSpec:
    name: str = opt("", "Directory-safe name of the eval set (default: the source's name and level)")
    data: DatasetSpec = opt(DatasetSpec, "Held-out questions (the fields of eval.data: source, split, level, limit)")


@dataclass
class ExperimentSpec:
    name: str = opt("", "Experiment name: the results go to runs/experiments/<name>/ unless --out says otherwise")
    preset: str | None = opt(None, "Base config: a shipped preset (quick, ...); or give `config`")
    config: str | None = opt(None, "Base config: a YAML config file (relative paths: to the experiment file)")
    set: list[str] = opt([], "Config overrides for every arm (key.sub=value)")
    seeds: list[int] = opt([0, 1, 2], "Seeds; each sets the config's top-level `seed` (all sampling and training)")
    eval: list[EvalSetSpec] = opt([], "Eval sets (default: the base config's eval.data)")
    arms: dict[str, ArmSpec] = opt({}, "Arm name -> {kind, set}; at least one arm")
    compare_to: list[str] = opt(
        [],
        "Arms every other arm is paired against in the results (default: the base arm and the SSB arm, i.e. the "
        "arm named ssb, else the first arm of kind ssb); the first ssb arm named here is also the one whose compute "
        "GRPO arms match (grpo.match_compute=tokens) and the compute table compares with",
    )
    bootstrap_iters: int = opt(10000, "Bootstrap resamples for every interval")
    difficulty_samples: int = opt(
        0,
        "Samples per held-out problem (the base model at rollout.temperature / top_k / top_p) that estimate how "
        "hard each problem is for it; 0 = off, else >= 2. The results then split each arm's gain over base by "
        "that difficulty: never solved, sometimes (what curation calls mixed) and always solved",
    )
    source: str = field(default="", metadata={"help": "The file this spec was read from (filled in on loading)"})


def _err(path: Path, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check an experiment YAML: unknown keys, types, arms and every arm's config (built for the first
    seed) fail here, naming the key, before anything runs."""
    path = Path(path)
    raw = read_yaml(path)
    names = {f.name for f in dataclasses.fields(ExperimentSpec)} - {"source"}
    for key in raw:
        if key not in names:
            raise _err(path, f"unknown key '{key}' (valid: {', '.join(sorted(names))})")
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise _err(path, f"key 'name': letters, digits, '.', '_' and '-' only, got {name!r}")
    if (raw.get("preset") is None) == (raw.get("config") is None):
        raise _err(path, "give exactly one of 'preset' (a shipped preset) and 'config' (a YAML config file)")
    config = raw.get("config")
    if config is not None:
        if not isinstance(config, str):
            raise _err(path, f"key 'config': expected a path, got {config!r}")
        config = str((path.parent / config) if not Path(config).is_absolute() else Path(config))
    overrides = _str_list(path, "set", raw.get("set", []))
    seeds = raw.get("seeds", [0, 1, 2])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise _err(path, f"key 'seeds': expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise _err(path, f"key 'seeds': repeated seed in {seeds}")
    iters = raw.get("bootstrap_iters", 10000)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 100:
        raise _err(path, f"key 'bootstrap_iters': expected an integer >= 100, got {iters!r}")
    difficulty = raw.get("difficulty_samples", 0)
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty < 0 or difficulty == 1:
        raise _err(path, f"key 'difficulty_samples': expected 0 (off) or an integer >= 2, got {difficulty!r}")
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise _err(path, "key 'arms': expected a mapping of arm name -> {kind, set}, with at least one arm")
    arms = {}
    for arm, body in arms_raw.items():
        if not isinstance(arm, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", arm):
            raise _err(path, f"key 'arms': arm name {arm!r}: letters, digits, '.', '_' and '-' only")
        body = body or {}
        if not isinstance(body, dict):
            raise _err(path, f"key 'arms.{arm}': expected a mapping with 'kind' and optional 'set', got {body!r}")
        unknown = set(body) - {"kind", "set"}
        if unknown:
            raise _err(path, f"unknown key 'arms.{arm}.{sorted(unknown)[0]}' (valid: kind, set)")
        kind = body.get("kind", "ssb")
        if kind not in KINDS:
            raise _err(path, f"key 'arms.{arm}.kind': must be one of {list(KINDS)}, got {kind!r}")
        arms[arm] = ArmSpec(kind=kind, set=_str_list(path, f"arms.{arm}.set", body.get("set", [])))
    compare_to = _str_list(path, "compare_to", raw.get("compare_to", []))
    for arm in compare_to:
        if arm not in arms:
            raise _err(path, f"key 'compare_to': {arm!r} is not an arm (arms: {', '.join(arms)})")
    spec = ExperimentSpec(
        name=name,
        preset=raw.get("preset"),
        config=config,
        set=overrides,
        seeds=seeds,
        eval=[],
        arms=arms,
        compare_to=compare_to,
        bootstrap_iters=iters,
        difficulty_samples=difficulty,
        source=str(path),
    )
    evals = raw.get("eval")
    if evals is None:
        spec.eval = [EvalSetSpec(name=default_eval_name(base_config(spec).eval.data), data=base_config(spec).eval.data)]
    else:
        spec.eval = _eval_sets(path, evals)
    for arm in arms:  # every arm's config must build: fail now, not after an hour of rollouts
        try:
            cfg = arm_config(spec, arm, seeds[0])
        except ConfigError as e:
            raise _err(path, f"arm '{arm}': {e}") from None
        if arms[arm].kind == "grpo" and cfg.grpo.match_compute == "tokens" and budget_arm(spec) is None:
            raise _err(
                path,
                f"arm '{arm}': grpo.match_compute=tokens matches an SSB arm's compute of the same seed, and the "
                "experiment has no arm of kind ssb",
            )
    return spec


def reference_arm(spec: ExperimentSpec, kind: str) -> str | None:
    """The arm named like `kind`, else the first arm of that kind (None if there is none)."""
    if kind in spec.arms:
        return kind
    return next((arm for arm, a in spec.arms.items() if a.kind == kind), None)


def budget_arm(spec: ExperimentSpec) -> str | None:
    """The SSB arm whose compute a GRPO arm with grpo.match_compute=tokens matches, seed by seed, and that the
    compute table compares with: the first arm of kind ssb in `compare_to`, else the SSB reference arm."""
    named = [arm for arm in spec.compare_to if spec.arms[arm].kind == "ssb"]
    return named[0] if named else reference_arm(spec, "ssb")


def comparison_arms(spec: ExperimentSpec) -> list[str]:
    """The arms every other arm is paired against: `compare_to`, else the base arm and the SSB arm."""
    return spec.compare_to or [r for r in (reference_arm(spec, "base"), reference_arm(spec, "ssb")) if r]


def _str_list(path: Path, key: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(path, f"key '{key}': expected a list of 'key.sub=value' strings, got {value!r}")
    return list(value)


def default_eval_name(data: DatasetSpec) -> str:
    if data.source == "arith":
        return f"arith-l{data.level}"
    return Path(data.source).stem if ("/" in data.source or "." in data.source) else data.source


def _eval_sets(path: Path, evals) -> list[EvalSetSpec]:
    if not isinstance(evals, list) or not evals:
        raise _err(path, "key 'eval': expected a non-empty list of eval sets ({name, source, split, level, limit})")
    out: list[EvalSetSpec] = []
    for i, item in enumerate(evals):
        if not isinstance(item, dict):
            raise _err(path, f"key 'eval[{i}]': expected a mapping, got {item!r}")
        body = dict(item)
        name = body.pop("name", None)
        body.setdefault("split", "test")
        try:
            data = build_dataclass(DatasetSpec, body, f"eval[{i}].")
        except ConfigError as e:
            raise _err(path, str(e)) from None
        name = name or default_eval_name(data)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(name)):
            raise _err(path, f"key 'eval[{i}].name': letters, digits, '.', '_' and '-' only, got {name!r}")
        if any(e.name == name for e in out):
            raise _err(path, f"key 'eval[{i}].name': {name!r} is used twice; name the eval sets apart")
        out.append(EvalSetSpec(name=str(name), data=data))
    return out


def base_config(spec: ExperimentSpec, seed: int | None = None) -> Config:
    """The experiment's base config (preset or file + the experiment's `set`), before any arm's overrides."""
    return _load(spec, list(spec.set) + ([f"seed={seed}"] if seed is not None else []))


def arm_config(spec: ExperimentSpec, arm: str, seed: int) -> Config:
    """The config one arm trains under for one seed: base <- experiment `set` <- arm `set` <- seed (<- SFT)."""
    from ssb.stages.run import sft_config

    cfg = _load(spec, list(spec.set) + list(spec.arms[arm].set) + [f"seed={seed}"])
    return sft_config(cfg) if spec.arms[arm].kind == "sft" else cfg


def _load(spec: ExperimentSpec, overrides: list[str]) -> Config:
    from ssb.config import preset_path

    if spec.preset is not None:
        return load_config(None, overrides, base=read_yaml(preset_path(spec.preset)))
    return load_config(spec.config, overrides)


def spec_to_dict(spec: ExperimentSpec, seeds: list[int] | None = None) -> dict:
    """The resolved spec as saved beside the outputs (experiment.yaml)."""
    d = dataclasses.asdict(spec)
    if seeds is not None:
        d["seeds"] = list(seeds)
    return d


def dump_spec(spec: ExperimentSpec, seeds: list[int] | None = None) -> str:
    return yaml.safe_dump(spec_to_dict(spec, seeds), sort_keys=False, width=120)


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ArmRun:
    """One arm under one seed: its config and its run directory."""

    seed: int
    arm: str
    kind: str
    cfg: Config
    run: RunDir


def arm_runs(spec: ExperimentSpec, out: Path, seed: int) -> list[ArmRun]:
    share = out / "stage-index"
    return [
        ArmRun(seed, arm, a.kind, arm_config(spec, arm, seed), RunDir(out / f"seed-{seed}" / arm, share=share))
        for arm, a in spec.arms.items()
    ]


def greedy(cfg: Config) -> bool:
    return cfg.eval.temperature == 0


def difficulty_dir(out: Path, eval_name: str) -> Path:
    """The base model's sampled evaluation that estimates each problem's difficulty (`difficulty_samples`)."""
    return out / "shared" / "difficulty" / eval_name


def difficulty_config(spec: ExperimentSpec, data: DatasetSpec) -> Config:
    """The base model sampled `difficulty_samples` times per problem, as the rollouts sample (seed 0: once for
    all seeds)."""
    cfg = base_config(spec, seed=0)
    rc = cfg.rollout
    ev = dataclasses.replace(
        cfg.eval, data=data, n=spec.difficulty_samples, temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p
    )
    return dataclasses.replace(cfg, eval=ev)


def eval_dir(out: Path, ar: ArmRun, eval_name: str) -> Path:
    """Where an arm's evaluation on one eval set lives (the shared one for a greedy base arm)."""
    if ar.kind == "base" and greedy(ar.cfg):
        return out / "shared" / ar.arm / "eval" / eval_name
    return ar.run.eval_dir(ar.arm, eval_name)
