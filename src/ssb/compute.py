"""Compute budgets of SSB and of the RL baselines in one run directory, counted the same way for both.

Tokens are the tokens at which a model samples, is scored as teacher, or takes a loss; prompt tokens are not
counted on either side:

    SSB   generated = rollout tokens + teacher-attempt tokens (every attempt, every question batch)
          forward   = teacher solution tokens scored by the logits stage (logits.mode online: scored again in
                      each epoch, so trained tokens)
          trained   = student solution tokens x train.epochs
    GRPO  generated = completion tokens sampled
          trained   = the same tokens (each completion takes one gradient step: TRL's num_iterations = 1)

Seconds are the manifest's seconds of the stages (SSB: rollout, curate, teach, logits, train, whose teach stage
includes any further question batches; GRPO: its own stage), evaluation left out on both sides, twice: wall
seconds, and CPU seconds of the stage's processes and their subprocesses (`ssb.processes`; summed over the ranks of
a multi-process stage). Wall seconds also count whatever else the machine did meanwhile and any time the run sat
paused; CPU seconds do not, so they are the ones to compare on a shared machine. Run directories written before
CPU seconds were recorded have none (None here, a dash in the tables).

`grpo.match_compute: tokens` sets GRPO's max_steps from SSB's token total before GRPO starts (`matched_grpo_steps`):
a GRPO step samples batch_size x grad_accum x num_generations completions and trains on them, and at the start a
completion is about as long as a rollout of the same model on the same prompts, so

    max_steps = round(SSB tokens / (2 x batch_size x grad_accum x num_generations x L)),  at least 1,

with L = the rollouts' mean length (capped at grpo.max_completion_length). The budgets actually spent are printed
after training, so a drift in completion length shows.
"""

from __future__ import annotations

from ssb.config import Config, ConfigError
from ssb.files import read_jsonl
from ssb.rundir import RunDir

SSB_STAGES = ("rollout", "curate", "teach", "logits", "train")
RL_LABELS = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO"}


def _counts(stages: dict, name: str) -> dict:
    return (stages.get(name) or {}).get("counts") or {}


def ssb_budget(run: RunDir, epochs: float) -> dict | None:
    """SSB's tokens and seconds in `run` (None until rollout, teach, logits and train have all finished)."""
    stages = run.read_manifest()["stages"]
    if any((stages.get(s) or {}).get("status") != "done" for s in ("rollout", "teach", "logits", "train")):
        return None
    rollout = _counts(stages, "rollout").get("tokens", 0)
    rollout += sum(_counts(b.read_manifest()["stages"], "rollout").get("tokens", 0) for b in run.batch_dirs())
    teach = sum(a.get("num_tokens", 0) for b in [run, *run.batch_dirs()] for a in read_jsonl(b.teach_attempts))
    solution = _counts(stages, "train").get("solution_tokens", 0)
    trained = round(solution * epochs)
    logits = _counts(stages, "logits")
    forward = trained if logits.get("mode") == "online" else logits.get("tokens", 0)
    seconds = {s: (stages.get(s) or {}).get("seconds") or 0.0 for s in SSB_STAGES}
    cpu = [(stages.get(s) or {}).get("cpu_seconds") for s in SSB_STAGES]
    return {
        "generated_tokens": rollout + teach,
        "rollout_tokens": rollout,
        "teach_tokens": teach,
        "forward_tokens": forward,
        "trained_tokens": trained,
        "tokens": rollout + teach + forward + trained,
        "seconds": round(sum(seconds.values()), 2),
        "stage_seconds": seconds,
        "cpu_seconds": None if None in cpu else round(sum(cpu), 2),
    }


def rl_budget(run: RunDir, name: str = "grpo") -> dict | None:
    """An RL baseline's tokens and seconds (None until its stage has finished)."""
    entry = run.stage_entry(name) or {}
    if entry.get("status") != "done":
        return None
    generated = entry.get("counts", {}).get("generated_tokens", 0)
    return {
        "generated_tokens": generated,
        "trained_tokens": generated,
        "tokens": 2 * generated,
        "seconds": entry.get("seconds") or 0.0,
        "cpu_seconds": entry.get("cpu_seconds"),
        "steps": entry.get("counts", {}).get("steps"),
    }


def matched_grpo_steps(cfg: Config, run: RunDir) -> tuple[int, str]:
    """(max_steps giving GRPO about SSB's token budget, a line saying how); the rule is in the module docstring."""
    budget = ssb_budget(run, cfg.train.epochs)
    if budget is None:
        raise ConfigError(
            f"config key 'grpo.match_compute': 'tokens' needs SSB's rollout, teach, logits and train stages "
            f"finished in {run.root} (`ssb run` runs them first)"
        )
    gc = cfg.grpo
    rollout = _counts(run.read_manifest()["stages"], "rollout")
    length = min(float(rollout.get("mean_tokens") or gc.max_completion_length), float(gc.max_completion_length))
    per_step = 2 * gc.batch_size * gc.grad_accum * gc.num_generations * max(1.0, length)
    steps = max(1, round(budget["tokens"] / per_step))
    note = (
        f"match_compute=tokens: SSB spent {budget['tokens']:,} tokens; a step of {gc.batch_size} x "
        f"{gc.num_generations} completions of ~{length:.0f} tokens (rollouts' mean), generated and trained, is "
        f"~{per_step:,.0f}: max_steps = {steps}"
    )
    return steps, note


def budget_lines(run: RunDir, epochs: float) -> list[str]:
    """Printable budgets of SSB and each finished RL baseline, with the baselines' ratios to SSB."""
    ssb = ssb_budget(run, epochs)
    if ssb is None:
        return []
    sec = ssb["stage_seconds"]
    lines = [
        f"[compute] SSB: {ssb['tokens']:,} tokens (generated {ssb['generated_tokens']:,} = rollout "
        f"{ssb['rollout_tokens']:,} + teach {ssb['teach_tokens']:,}; teacher forward {ssb['forward_tokens']:,}; "
        f"trained {ssb['trained_tokens']:,}), {ssb['seconds']:,.0f} s ("
        + ", ".join(f"{s} {sec[s]:.0f}" for s in SSB_STAGES)
        + f"), CPU {_cpu(ssb)}"
    ]
    for name, label in RL_LABELS.items():
        rl = rl_budget(run, name)
        if rl is None:
            continue
        ratio_t = rl["tokens"] / ssb["tokens"] if ssb["tokens"] else float("nan")
        ratio_s = rl["seconds"] / ssb["seconds"] if ssb["seconds"] else float("nan")
        ratio_c = cpu_ratio(rl, ssb)
        lines.append(
            f"[compute] {label}: {rl['tokens']:,} tokens (generated {rl['generated_tokens']:,}, trained "
            f"{rl['trained_tokens']:,}; {rl['steps']} steps), {rl['seconds']:,.0f} s, CPU {_cpu(rl)}: "
            f"{ratio_t:.2f}x SSB's tokens, {ratio_s:.2f}x its seconds"
            + (f", {ratio_c:.2f}x its CPU seconds" if ratio_c is not None else "")
        )
    return lines


def cpu_ratio(a: dict, b: dict) -> float | None:
    """a's CPU seconds over b's (None when either run directory predates CPU seconds or b spent none)."""
    if a.get("cpu_seconds") is None or not b.get("cpu_seconds"):
        return None
    return a["cpu_seconds"] / b["cpu_seconds"]


def _cpu(budget: dict) -> str:
    return "not recorded" if budget.get("cpu_seconds") is None else f"{budget['cpu_seconds']:,.0f} s"
