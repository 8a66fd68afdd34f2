"""Stage 2, `ssb curate`: keep questions the model sometimes solves, and build the teacher's hinted prompt.

A question is kept when at least one rollout is correct and at least one reached a wrong (extracted) answer.
From it we take one correct rollout (seeded random choice) and a rollout carrying the most common wrong answer
(seeded random choice among the wrong ones when no wrong answer repeats, or among the tied most common ones).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

from ssb.config import Config
from ssb.files import write_jsonl
from ssb.lifecycle import stage
from ssb.prompts import load_template, student_messages, teacher_messages
from ssb.records import check_rollout, read_checked
from ssb.rundir import RunDir


def answer_key(answer: str) -> str:
    """Group wrong answers that differ only in form, so '18', '18.0' and '1,8' count as one answer.

    >>> answer_key("18.0") == answer_key("18") == answer_key(" 18 ") == answer_key("1,8")
    True
    """
    a = answer.strip().rstrip(".").replace(" ", "")
    try:
        x = float(a.replace(",", ""))
    except ValueError:
        return a
    if x != x or abs(x) > 1e15:  # nan, or too large to print exactly
        return a
    return repr(int(x)) if x.is_integer() else repr(x)


def classify(rollouts: list[dict]) -> str:
    """'mixed' (kept), 'all_correct' (no wrong answer), 'all_wrong' (no correct one) or 'unparsed' (no answer)."""
    correct = sum(r["verdict"] == "correct" for r in rollouts)
    wrong = sum(r["verdict"] == "incorrect" for r in rollouts)
    if correct and wrong:
        return "mixed"
    if correct:
        return "all_correct"
    if wrong:
        return "all_wrong"
    return "unparsed"


def choose_pair(rollouts: list[dict], rng: random.Random, negative: bool = True) -> tuple[dict, dict | None, int]:
    """(correct rollout, wrong rollout or None, how many rollouts share that wrong answer)."""
    correct = rng.choice([r for r in rollouts if r["verdict"] == "correct"])
    if not negative:
        return correct, None, 0
    wrong = [r for r in rollouts if r["verdict"] == "incorrect"]
    counts = Counter(answer_key(r["extracted"]) for r in wrong)
    top = max(counts.values())
    pool = [r for r in wrong if counts[answer_key(r["extracted"])] == top] if top > 1 else wrong
    return correct, rng.choice(pool), top


def curate(cfg: Config, run: RunDir, force: bool = False) -> dict:
    curate_cfg = dataclasses.asdict(cfg.curate)
    if curate_cfg["order"] == "correct_first":  # the default: runs from before the option keep their hash
        del curate_cfg["order"]
    parts = (curate_cfg, cfg.rollout.system_prompt, cfg.seed)
    template = load_template(cfg.curate.template, negative=cfg.curate.negative, order=cfg.curate.order)

    def check() -> list[dict]:  # read-only: a torn last line is reported, and the rollout stage redoes it
        records = read_checked(run.rollouts, check_rollout, repair=False)
        if not records:
            raise FileNotFoundError(f"{run.rollouts}: no rollouts; run `ssb rollout` first")
        return records

    inputs, outputs = [run.rollouts], [run.curated]
    with stage(run, "curate", parts + (template,), inputs, outputs, force=force, check=check) as st:
        if st is None:
            return run.stage_entry("curate")["counts"]
        records = st.checked
        funnel = Counter()
        kept = []
        for rec in records:
            kind = classify(rec["rollouts"])
            funnel[kind] += 1
            if kind != "mixed":
                continue
            rng = random.Random(f"{cfg.seed}-{rec['id']}")
            good, bad, n_bad = choose_pair(rec["rollouts"], rng, negative=cfg.curate.negative)
            system = cfg.rollout.system_prompt
            kept.append(
                {
                    "id": rec["id"],
                    "question": rec["question"],
                    "gold": rec["gold"],
                    "correct": good["text"],
                    "correct_answer": good["extracted"],
                    "wrong": bad["text"] if bad else None,
                    "wrong_answer": bad["extracted"] if bad else None,
                    "wrong_answer_count": n_bad,
                    "n_correct": sum(r["verdict"] == "correct" for r in rec["rollouts"]),
                    "teacher_messages": teacher_messages(
                        template, rec["question"], good["text"], bad["text"] if bad else None, system
                    ),
                    "student_messages": student_messages(rec["question"], system),
                }
            )
        write_jsonl(run.curated, kept)
        st.counts.update(
            questions=len(records),
            mixed=funnel["mixed"],
            all_correct=funnel["all_correct"],
            all_wrong=funnel["all_wrong"],
            unparsed=funnel["unparsed"],
            kept=len(kept),
        )
        st.say(
            f"[curate] funnel: {len(records)} questions -> {funnel['all_correct']} all correct, "
            f"{funnel['all_wrong']} all wrong, {funnel['unparsed']} unparsed, {funnel['mixed']} mixed (kept)"
        )
        return dict(st.counts)
