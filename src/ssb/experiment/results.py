"""An experiment's results: per eval set, each arm's mean pass@1 over seeds with a 95% interval over seeds and
problems, the per-seed rows, paired differences against base and against SSB, the yield funnel per seed, each
arm's compute, and figures. Written to OUT/results.md, OUT/results.json and OUT/*.png; reads only finished
evaluations and manifests, so it can be rewritten at any time (after every seed, or by hand:
`ssb experiment CONFIG --results-only`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ssb.experiment.spec import (
    ExperimentSpec,
    arm_runs,
    budget_arm,
    comparison_arms,
    difficulty_dir,
    eval_dir,
    reference_arm,
)
from ssb.files import atomic_write_json, atomic_write_text, read_jsonl
from ssb.metrics import Scores, crossed_bootstrap, paired_crossed_bootstrap
from ssb.rundir import SAMPLES, SUMMARY, RunDir


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def load_arm(out: Path, spec: ExperimentSpec, arm: str, eval_name: str, seeds: list[int]) -> tuple[Scores, dict]:
    """(scores by seed, per-seed eval summaries) of one arm on one eval set, over the seeds that finished."""
    by_seed: dict[int, dict[str, float]] = {}
    cluster: dict[str, str] = {}
    summaries: dict[int, dict] = {}
    for seed in seeds:
        ar = next(a for a in arm_runs(spec, out, seed) if a.arm == arm)
        d = eval_dir(out, ar, eval_name)
        if not (d / SUMMARY).exists():
            continue
        summaries[seed] = json.loads((d / SUMMARY).read_text())
        records = read_jsonl(d / SAMPLES)
        by_seed[seed] = {r["id"]: r["correct"] / len(r["samples"]) for r in records}
        cluster.update({r["id"]: r.get("cluster") or r["id"] for r in records})
    return Scores(by_seed, cluster), summaries


def funnel(out: Path, spec: ExperimentSpec, seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Per trained arm and seed: questions, rollout correct share, mixed share, teacher pass rate, pairs trained."""
    rows: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for ar in arm_runs(spec, out, seed):
            if ar.kind not in ("ssb", "sft", "grpo") or not ar.run.manifest_path.exists():
                continue
            st = ar.run.read_manifest()["stages"]
            c = {k: (st.get(k) or {}).get("counts") or {} for k in ("rollout", "curate", "teach", "train", "grpo")}
            row = {
                "k": ar.cfg.rollout.k,
                "questions": c["rollout"].get("questions"),
                "rollout_correct_share": c["rollout"].get("correct_share"),
                "mixed": c["curate"].get("mixed"),
                "mixed_share": (c["curate"]["mixed"] / c["curate"]["questions"])
                if c["curate"].get("questions")
                else None,
                "teacher_pass_rate": c["teach"].get("pass_rate_first_attempt"),
                "teacher_attempts": c["teach"].get("attempts"),
                "pairs": c["teach"].get("pairs"),
                "pairs_trained": c["train"].get("pairs"),
                "train_steps": c["train"].get("steps") or c["grpo"].get("steps"),
            }
            if ar.run.batch_dirs():  # teach.target_pairs drew more batches: count every batch, not the first
                row.update(_over_batches(ar.run, c["teach"].get("funnel") or {}))
            rows.setdefault(ar.arm, {})[seed] = row
    return rows


def _over_batches(run: RunDir, teach_funnel: dict) -> dict:
    """The funnel's question, mixed and rollout-correct counts over the run's own batch and every further one."""
    rollouts = [
        (b.read_manifest()["stages"].get("rollout") or {}).get("counts") or {} for b in [run, *run.batch_dirs()]
    ]
    done = [r for r in rollouts if r.get("questions") and r.get("correct_share") is not None]
    questions = sum(r["questions"] for r in done)
    out = {"batches": len(rollouts), "rollout_correct_share": None}
    if questions:  # every batch has the same K, so weighting by questions weights by rollouts
        out["rollout_correct_share"] = sum(r["questions"] * r["correct_share"] for r in done) / questions
    if teach_funnel.get("questions"):
        out.update(
            questions=teach_funnel["questions"],
            mixed=teach_funnel["mixed"],
            mixed_share=teach_funnel["mixed"] / teach_funnel["questions"],
        )
    return out


def compute(out: Path, spec: ExperimentSpec, seeds: list[int]) -> dict[str, dict[int, dict]]:
    """Per trained arm and seed: its compute budget as `ssb.compute` counts it (tokens generated, scored and
    trained; stage wall and CPU seconds), so GRPO arms can be read against the SSB arm whose budget they match."""
    from ssb.compute import rl_budget, ssb_budget

    rows: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for ar in arm_runs(spec, out, seed):
            if ar.kind == "base" or not ar.run.manifest_path.exists():
                continue
            b = rl_budget(ar.run, "grpo") if ar.kind == "grpo" else ssb_budget(ar.run, ar.cfg.train.epochs)
            if b is not None:
                keys = ("tokens", "generated_tokens", "trained_tokens", "seconds", "cpu_seconds")
                rows.setdefault(ar.arm, {})[seed] = {k: b[k] for k in keys}
    return rows


def _compute_lines(rows: dict[str, dict[int, dict]], spec: ExperimentSpec) -> list[str]:
    if not rows:
        return []
    ref = budget_arm(spec)
    # CPU seconds are averaged below over the seeds that recorded them, not here
    keys = ("tokens", "generated_tokens", "trained_tokens", "seconds")
    mean = {arm: {k: _mean_of(by, k) for k in keys} for arm, by in rows.items()}
    lines = [
        "",
        "## Compute per arm (mean over seeds)",
        "",
        "Tokens as `ssb.compute` counts them: generated (rollouts, teacher attempts; GRPO's completions), scored "
        "by the teacher, and trained on; prompt tokens are not counted. Seconds: the stages' wall time, evaluation "
        "left out; it also counts anything else the machine did meanwhile and any pause. CPU seconds: the stages' "
        "processes and subprocesses, summed over ranks, which a busy or paused machine does not inflate (mean over "
        "the seeds that recorded them, named when not all did; ratios over the seeds both arms recorded; a dash: "
        "none). A stage an arm copied from another (same config and inputs) counts in full for "
        "both: it is what the arm's method needs. GRPO arms with grpo.match_compute=tokens set their steps from "
        f"{ref or 'the ssb arm'}'s tokens in the same seed (docs/quality.md).",
        "",
        f"| arm | seeds | tokens | generated | trained | seconds | CPU seconds | tokens vs {ref} | seconds vs {ref} "
        f"| CPU seconds vs {ref} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    r = mean.get(ref) or {}

    def ratio(m: dict, key: str) -> str:
        return f"{m[key] / r[key]:.2f}x" if r.get(key) and m.get(key) is not None else "–"

    def cpu(arm: str, seeds: list[int]) -> float | None:
        values = [rows[arm][s]["cpu_seconds"] for s in seeds if rows[arm].get(s, {}).get("cpu_seconds") is not None]
        return sum(values) / len(values) if values else None

    for arm, m in mean.items():
        recorded = [s for s, row in rows[arm].items() if row.get("cpu_seconds") is not None]
        cell = "–" if not recorded else f"{cpu(arm, recorded):,.0f}"
        if recorded and len(recorded) < len(rows[arm]):  # a run directory from before CPU seconds were recorded
            cell += f" (seed{'s' if len(recorded) > 1 else ''} {', '.join(map(str, recorded))})"
        common = [s for s in recorded if s in rows.get(ref, {}) and rows[ref][s].get("cpu_seconds") is not None]
        base = cpu(ref, common) if ref in rows else None
        cpu_ratio = f"{cpu(arm, common) / base:.2f}x" if common and base else "–"
        lines.append(
            f"| {arm} | {len(rows[arm])} | {m['tokens']:,.0f} | {m['generated_tokens']:,.0f} | "
            f"{m['trained_tokens']:,.0f} | {m['seconds']:,.0f} | {cell} | {ratio(m, 'tokens')} | "
            f"{ratio(m, 'seconds')} | {cpu_ratio} |"
        )
    return lines


DIFFICULTY = ("never", "sometimes", "always")
QUALITY = ("wrong_step_share", "correct_with_wrong_step_share", "looping_share")


def _mean_of(summaries: dict[int, dict], key: str) -> float | None:
    values = [s.get(key) for s in summaries.values()]
    return None if any(v is None for v in values) else sum(values) / len(values)


def _share(x: float | None) -> str:
    return "–" if x is None else f"{_pts(x)}%"


def difficulty_bins(samples: Path) -> dict[str, str]:
    """Problem id -> how often the base model's samples solved it: never (0 of n), sometimes, always (n of n)."""
    bins = {}
    for r in read_jsonl(samples):
        c, n = r["correct"], len(r["samples"])
        bins[r["id"]] = "never" if c == 0 else ("always" if c == n else "sometimes")
    return bins


def _restrict(sc: Scores, ids: set[str]) -> Scores:
    return Scores({s: {i: v for i, v in d.items() if i in ids} for s, d in sc.by_seed.items()}, sc.cluster)


def by_difficulty(scores: dict[str, Scores], ref: str, bins: dict[str, str], iters: int) -> list[dict]:
    """Each arm's paired difference against `ref` within each difficulty bin: does the gain come from problems
    the base model sometimes solves (the kind curation keeps) or also from those it never or always solves?"""
    rows = []
    for b in DIFFICULTY:
        ids = {i for i, v in bins.items() if v == b}
        if not ids or ref not in scores:
            continue
        base = _restrict(scores[ref], ids)
        for arm, sc in scores.items():
            if arm == ref:
                continue
            try:
                d = paired_crossed_bootstrap(_restrict(sc, ids), base, iters=iters)
            except ValueError:  # no problem of the bin scored by both
                continue
            rows.append({"arm": arm, "bin": b, "ref_pass@1": base.mean(), **d})
    return rows


def collect(spec: ExperimentSpec, out: Path, seeds: list[int], iters: int) -> dict:
    result: dict = {"name": spec.name, "seeds": seeds, "bootstrap_iters": iters, "eval": {}}
    refs = comparison_arms(spec)
    for ev in spec.eval:
        arms, scores = {}, {}
        for arm, a in spec.arms.items():
            sc, summaries = load_arm(out, spec, arm, ev.name, seeds)
            if not sc.by_seed:
                arms[arm] = {"kind": a.kind, "seeds_done": []}
                continue
            scores[arm] = sc
            boot = crossed_bootstrap(sc, iters=iters)
            n = len(summaries)
            arms[arm] = {
                "kind": a.kind,
                "seeds_done": sorted(sc.by_seed),
                "pass@1": boot["mean"],
                "low": boot["low"],
                "high": boot["high"],
                "problems": boot["problems"],
                "clusters": boot["clusters"],
                "per_seed": {s: summaries[s]["pass@1"] for s in sorted(summaries)},
                "mean_tokens": sum(s["mean_tokens"] for s in summaries.values()) / n,
                "truncated_share": sum(s["truncated_share"] for s in summaries.values()) / n,
                # reasoning beyond the final answer (ssb.verify.steps), averaged over seeds; None in older summaries
                **{k: _mean_of(summaries, k) for k in QUALITY},
            }
        paired = []
        for ref in refs:
            if ref not in scores:
                continue
            for arm in spec.arms:
                if arm == ref or arm not in scores or any(p["a"] == ref and p["b"] == arm for p in paired):
                    continue
                try:
                    d = paired_crossed_bootstrap(scores[arm], scores[ref], iters=iters)
                except ValueError:
                    continue
                paired.append({"a": arm, "b": ref, **d})
        result["eval"][ev.name] = {"source": ev.data.source, "level": ev.data.level, "arms": arms, "paired": paired}
        diff_samples = difficulty_dir(out, ev.name) / SUMMARY
        base = reference_arm(spec, "base")
        if spec.difficulty_samples and diff_samples.exists() and base:
            bins = difficulty_bins(diff_samples.with_name(SAMPLES))
            result["eval"][ev.name]["difficulty"] = {
                "samples": spec.difficulty_samples,
                "problems": {b: sum(v == b for v in bins.values()) for b in DIFFICULTY},
                "rows": by_difficulty(scores, base, bins, iters),
            }
    result["funnel"] = funnel(out, spec, seeds)
    result["compute"] = compute(out, spec, seeds)
    return result


def render(res: dict, spec: ExperimentSpec) -> str:
    lines = [f"# Experiment `{res['name']}`", ""]
    lines.append(
        f"Seeds: {', '.join(map(str, res['seeds']))}. Reproduce: `ssb experiment {spec.source}` (resumes if "
        f"interrupted). Intervals: 95% percentile intervals from a bootstrap that resamples seeds and clusters of "
        f"problems ({res['bootstrap_iters']} resamples; built-in arithmetic problems are clustered by calculation, "
        f"other problems are their own cluster); differences are paired (the same resampled seeds and clusters for "
        f"both arms). See docs/experiments.md."
    )
    for name, ev in res["eval"].items():
        lines += ["", f"## Eval set `{name}`", ""]
        some = next((a for a in ev["arms"].values() if a.get("seeds_done")), None)
        if some is None:
            lines.append("No finished evaluation yet.")
            continue
        lines.append(f"{some['problems']} problems in {some['clusters']} clusters.")
        lines += [
            "",
            "| arm | kind | seeds | pass@1 mean [95% CI] | per seed | mean tokens | truncated | looping | "
            "wrong step | right answer, wrong step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in ev["arms"].items():
            if not a.get("seeds_done"):
                lines.append(f"| {arm} | {a['kind']} | 0 | (not finished) | | | | | | |")
                continue
            per = ", ".join(f"{s}: {_pts(v)}" for s, v in a["per_seed"].items())
            lines.append(
                f"| {arm} | {a['kind']} | {len(a['seeds_done'])} | {_pts(a['pass@1'])}% [{_pts(a['low'])}, "
                f"{_pts(a['high'])}] | {per} | {a['mean_tokens']:.0f} | {_pts(a['truncated_share'])}% | "
                f"{_share(a.get('looping_share'))} | {_share(a.get('wrong_step_share'))} | "
                f"{_share(a.get('correct_with_wrong_step_share'))} |"
            )
        if ev["paired"]:
            lines += [
                "",
                "Paired differences (A − B, percentage points):",
                "",
                "| A | B | seeds | Δ pass@1 | 95% CI | p | reading |",
                "|---|---|---|---|---|---|---|",
            ]
            for p in ev["paired"]:
                reading = "A better" if p["low"] > 0 else ("A worse" if p["high"] < 0 else "not distinguishable")
                lines.append(
                    f"| {p['a']} | {p['b']} | {p['seeds']} | {_signed(p['diff'])} | [{_signed(p['low'])}, "
                    f"{_signed(p['high'])}] | {p['p']:.3g} | {reading} |"
                )
            half = {(p["a"], p["b"]): 100 * (p["high"] - p["low"]) / 2 for p in ev["paired"]}
            main = next((f" ({a} − {b}: {h:.1f})" for (a, b), h in half.items() if b == "base"), "")
            lines += [
                "",
                f"What this design can resolve: the paired intervals' half-widths are {min(half.values()):.1f} to "
                f"{max(half.values()):.1f} points{main}; a true difference smaller than about that would usually "
                f"read 'not distinguishable' here, and such a reading bounds the difference to its interval rather "
                f"than showing there is none.",
            ]
        lines += _difficulty_lines(ev.get("difficulty"))
    fun = res.get("funnel") or {}
    if fun:
        lines += [
            "",
            "## Yield funnel per seed",
            "",
            "| arm | seed | K | questions | rollouts correct | mixed (share) | teacher pass rate | pairs | "
            "pairs trained |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, by_seed in fun.items():
            for seed, r in by_seed.items():
                share = f"{r['mixed']} ({_pts(r['mixed_share'])}%)" if r["mixed_share"] is not None else "–"
                rc = f"{_pts(r['rollout_correct_share'])}%" if r["rollout_correct_share"] is not None else "–"
                tp = f"{_pts(r['teacher_pass_rate'])}%" if r["teacher_pass_rate"] is not None else "–"
                lines.append(
                    f"| {arm} | {seed} | {r['k']} | {r['questions'] if r['questions'] is not None else '–'} | {rc} | "
                    f"{share} | {tp} | {r['pairs'] if r['pairs'] is not None else '–'} | "
                    f"{r['pairs_trained'] if r['pairs_trained'] is not None else '–'} |"
                )
    lines += _compute_lines(res.get("compute") or {}, spec)
    figs = [p for p in ("pass1.png", "differences.png", "funnel.png") if p in res.get("figures", [])]
    if figs:
        lines += ["", "## Figures", ""] + [f"![{p}]({p})" for p in figs]
    return "\n".join(lines) + "\n"


def _difficulty_lines(diff: dict | None) -> list[str]:
    if not diff or not diff["rows"]:
        return []
    n, counts = diff["samples"], diff["problems"]
    lines = [
        "",
        f"Gain over base by the base model's difficulty of each problem ({n} samples per problem at the rollout "
        f"temperature: never solved {counts['never']}, sometimes {counts['sometimes']}, always {counts['always']} "
        "problems). Curation trains only on questions of the 'sometimes' kind; a gain confined to that bin, or a "
        "loss on the others, is what its discard would cost.",
        "",
        "| arm | base solves it | problems | base pass@1 | Δ pass@1 vs base | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for r in diff["rows"]:
        lines.append(
            f"| {r['arm']} | {r['bin']} | {r['problems']} | {_pts(r['ref_pass@1'])}% | {_signed(r['diff'])} | "
            f"[{_signed(r['low'])}, {_signed(r['high'])}] |"
        )
    return lines


def write_results(spec: ExperimentSpec, out: Path, seeds: list[int], iters: int | None = None) -> dict:
    from ssb.experiment.figures import write_figures

    res = collect(spec, out, seeds, iters or spec.bootstrap_iters)
    res["figures"] = write_figures(res, out)
    atomic_write_json(out / "results.json", res)
    text = render(res, spec)
    atomic_write_text(out / "results.md", text)
    print("\n" + text, flush=True)
    return res
