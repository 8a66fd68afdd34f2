"""Reading run directories for the report: manifests, eval summaries, training metrics and example solutions.

The report only reads; whatever a run has not produced yet is returned as missing (shown as "not run")."""

from __future__ import annotations

from pathlib import Path

from ssb.files import read_json_object
from ssb.records import check_id_only, check_metrics, need, read_checked
from ssb.rundir import RunDir

NOT_RUN = "not run"
STAGE_ORDER = ("rollout", "curate", "teach", "logits", "train", "grpo", "dr_grpo")
N_EXAMPLES = 3


def _jsonl(path: Path, check=check_id_only) -> list[dict]:
    return read_checked(path, check, repair=False)  # a report never modifies a run


def _check_pair(rec: dict, where: str) -> None:
    check_id_only(rec, where)
    need(rec, where, "question", str)
    need(rec, where, "solution", str)


def _check_attempt_tokens(rec: dict, where: str) -> None:
    need(rec, where, "num_tokens", int)


def read_evals(root: Path) -> list[dict]:
    """One row per RUN/eval/<model tag>/<benchmark>/summary.json."""
    rows = []
    for path in sorted((root / "eval").glob("**/summary.json")):
        s = read_json_object(path)
        rel = path.parent.relative_to(root / "eval").parts
        where = str(path)
        ci = need(s, where, "pass@1_ci", dict)
        rows.append(
            {
                "tag": rel[0] if len(rel) > 1 else "-",
                "benchmark": s.get("benchmark") or rel[-1],
                "n": need(s, where, "n", int),
                "problems": need(s, where, "problems", int),
                "pass1": need(s, where, "pass@1", float),
                "low": need(ci, where, "low", float, label="pass@1_ci.low"),
                "high": need(ci, where, "high", float, label="pass@1_ci.high"),
                "level": ci.get("level", 0.95) if isinstance(ci.get("level", 0.95), (int, float)) else 0.95,
                "maj": need(s, where, "maj@n", float),
                "mean_tokens": need(s, where, "mean_tokens", float),
                "truncated": need(s, where, "truncated_share", float),
                "looping": s.get("looping_share"),  # the reasoning-quality shares: absent in older summaries
                "wrong_step": s.get("wrong_step_share"),
                "right_wrong_step": s.get("correct_with_wrong_step_share"),
                "seconds": need(s, where, "wall_seconds", float, type(None)) if "wall_seconds" in s else None,
                "peak_rss_bytes": s.get("peak_rss_bytes"),
                "model": s.get("model"),
            }
        )
    return rows


def read_examples(run: RunDir, k: int = N_EXAMPLES) -> list[dict]:
    """The first k teacher pairs, with the wrong answer the hint showed (from curated.jsonl) when there was one."""
    pairs = _jsonl(run.pairs, _check_pair)[:k]
    curated = {c["id"]: c for c in _jsonl(run.curated)} if pairs else {}
    out = []
    for p in pairs:
        c = curated.get(p["id"], {})
        out.append(
            {
                "id": p["id"],
                "question": p["question"],
                "gold": p.get("gold"),
                "solution": p["solution"],
                "extracted": p.get("extracted"),
                "wrong_answer": c.get("wrong_answer"),
                "wrong": c.get("wrong"),
                "wrong_count": c.get("wrong_answer_count"),
                "correct_answer": c.get("correct_answer"),
            }
        )
    return out


# the counts the report computes with (other counts are not read)
_NUMERIC_COUNTS = (
    "questions", "all_correct", "all_wrong", "unparsed", "mixed", "pairs", "correct_share", "pass_rate_first_attempt",
    "steps", "solution_tokens", "train_loss", "completions", "reward_first", "reward_last", "tokens",
    "generated_tokens",
)  # fmt: skip


def _check_stages(stages: dict, path: Path) -> dict:
    """Stage entries as the report uses them: numbers where it computes, text where it prints."""
    for name, entry in stages.items():
        for key in ("seconds", "cpu_seconds"):
            if entry.get(key) is not None:
                need(entry, str(path), key, float, label=f"stages.{name}.{key}")
        counts = entry.get("counts") or {}
        if not isinstance(counts, dict):
            raise ValueError(f"{path}: field 'stages.{name}.counts': expected an object")
        for key in _NUMERIC_COUNTS:
            if counts.get(key) is not None:
                need(counts, str(path), key, float, label=f"stages.{name}.counts.{key}")
    return stages


def read_run(root: Path, label: str) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    run = RunDir(root)
    stages = _check_stages(run.read_manifest().get("stages", {}), run.manifest_path)
    teach_tokens = (
        sum(a["num_tokens"] for a in _jsonl(run.teach_attempts, _check_attempt_tokens)) if "teach" in stages else None
    )
    return {
        "label": label,
        "root": root,
        "stages": stages,
        "metrics": _jsonl(run.metrics, check_metrics),
        "grpo_metrics": _jsonl(run.grpo_metrics, check_metrics),
        "arm_metrics": {
            "SSB": _jsonl(run.metrics, check_metrics),
            "SFT": _jsonl(run.sft_run.metrics, check_metrics),
            "GRPO": _jsonl(run.rl_metrics("grpo"), check_metrics),
            "Dr. GRPO": _jsonl(run.rl_metrics("dr_grpo"), check_metrics),
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
