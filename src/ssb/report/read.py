"""Reading run directories for the report: manifests, eval summaries, training metrics and example solutions.

The report only reads; whatever a run has not produced yet is returned as missing (shown as "not run")."""

from __future__ import annotations

import json
from pathlib import Path

from ssb.files import read_jsonl
from ssb.rundir import RunDir

NOT_RUN = "not run"
STAGE_ORDER = ("rollout", "curate", "teach", "logits", "train", "grpo", "dr_grpo")
N_EXAMPLES = 3


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path, repair=False)  # a report never modifies a run


def _need(d: dict, key: str, path: Path):
    if key not in d:
        raise ValueError(f"{path}: missing field '{key}'")
    return d[key]


def read_evals(root: Path) -> list[dict]:
    """One row per RUN/eval/<model tag>/<benchmark>/summary.json."""
    rows = []
    for path in sorted((root / "eval").glob("**/summary.json")):
        try:
            s = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        rel = path.parent.relative_to(root / "eval").parts
        ci = _need(s, "pass@1_ci", path)
        rows.append(
            {
                "tag": rel[0] if len(rel) > 1 else "-",
                "benchmark": s.get("benchmark") or rel[-1],
                "n": _need(s, "n", path),
                "problems": _need(s, "problems", path),
                "pass1": _need(s, "pass@1", path),
                "low": _need(ci, "low", path),
                "high": _need(ci, "high", path),
                "level": ci.get("level", 0.95),
                "maj": _need(s, "maj@n", path),
                "mean_tokens": _need(s, "mean_tokens", path),
                "truncated": _need(s, "truncated_share", path),
                "looping": s.get("looping_share"),  # the reasoning-quality shares: absent in older summaries
                "wrong_step": s.get("wrong_step_share"),
                "right_wrong_step": s.get("correct_with_wrong_step_share"),
                "seconds": s.get("wall_seconds"),
                "peak_rss_bytes": s.get("peak_rss_bytes"),
                "model": s.get("model"),
            }
        )
    return rows


def read_examples(run: RunDir, k: int = N_EXAMPLES) -> list[dict]:
    """The first k teacher pairs, with the wrong answer the hint showed (from curated.jsonl) when there was one."""
    pairs = _jsonl(run.pairs)[:k]
    curated = {c["id"]: c for c in _jsonl(run.curated)} if pairs else {}
    out = []
    for p in pairs:
        c = curated.get(p["id"], {})
        out.append(
            {
                "id": p["id"],
                "question": _need(p, "question", run.pairs),
                "gold": p.get("gold"),
                "solution": _need(p, "solution", run.pairs),
                "extracted": p.get("extracted"),
                "wrong_answer": c.get("wrong_answer"),
                "wrong": c.get("wrong"),
                "wrong_count": c.get("wrong_answer_count"),
                "correct_answer": c.get("correct_answer"),
            }
        )
    return out


def read_run(root: Path, label: str) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    run = RunDir(root)
    stages = run.read_manifest().get("stages", {})
    teach_tokens = sum(a.get("num_tokens", 0) for a in _jsonl(run.teach_attempts)) if "teach" in stages else None
    return {
        "label": label,
        "root": root,
        "stages": stages,
        "metrics": _jsonl(run.metrics),
        "grpo_metrics": _jsonl(RunDir(root).grpo_dir / "metrics.jsonl"),
        "arm_metrics": {
            "SSB": _jsonl(run.metrics),
            "SFT": _jsonl(run.sft_run.metrics),
            "GRPO": _jsonl(run.rl_metrics("grpo")),
            "Dr. GRPO": _jsonl(run.rl_metrics("dr_grpo")),
        },
        "epochs": _train_epochs(run),
        "evals": read_evals(root),
        "examples": read_examples(run),
        "teach_tokens": teach_tokens,
    }


def _train_epochs(run: RunDir) -> float:
    """train.epochs of the run's saved config (the default when it has none), for the compute budget."""
    from ssb.config import TrainConfig, load_config

    if not run.config.exists():
        return TrainConfig().epochs
    try:
        return load_config(run.config).train.epochs
    except ValueError:  # an unreadable config: the budget falls back to the default, the report still renders
        return TrainConfig().epochs


def stage_counts(r: dict, stage: str) -> dict:
    return (r["stages"].get(stage) or {}).get("counts") or {}


def funnel(r: dict) -> dict[str, int | None]:
    """Bar name -> count (None where the stage has not run), in funnel order."""
    ro, cu, te = stage_counts(r, "rollout"), stage_counts(r, "curate"), stage_counts(r, "teach")
    return {
        "questions": ro.get("questions", cu.get("questions")),
        "all correct": cu.get("all_correct"),
        "all wrong": cu.get("all_wrong"),
        "unparsed": cu.get("unparsed"),
        "mixed (kept)": cu.get("mixed"),
        "verified pairs": te.get("pairs"),
    }
