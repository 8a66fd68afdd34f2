"""Stage 3, `ssb teach`: the base model answers its own hinted prompt; verified answers become training pairs.

Up to `teach.attempts` tries per question. Every attempt is logged in RUN/teach_attempts.jsonl; a solution is
kept in RUN/pairs.jsonl only if it stopped on its own (not cut at max_new_tokens) and its answer verifies.
The solution is tokenised once, here: `solution_ids` are the generated ids including the end-of-turn token,
so later stages append them to either prompt without re-tokenising joined strings.

Crash safety: a kept pair is written (and fsynced) before its attempt is logged, so a kill between the two never
loses a verified pair; a resumed stage logs the attempt of any pair whose log line the kill prevented. A hinted
prompt too long for the model's context (question + two rollouts + the teacher's answer) is left out with a
warning naming it, and counted.
"""

from __future__ import annotations

from ssb.config import Config
from ssb.files import JsonlWriter
from ssb.models import generation_dtype_name
from ssb.records import check_attempt, check_curated, check_id_only, read_checked
from ssb.rundir import RunDir, stage


def teach(cfg: Config, run: RunDir, force: bool = False) -> dict:
    from ssb.engine.engine import Engine, SamplingParams
    from ssb.models import load_from_config
    from ssb.stages.inputs import too_long
    from ssb.verify import Verifier

    tc = cfg.teach
    parts = (cfg.model, tc, cfg.rollout.policy, cfg.seed, generation_dtype_name(cfg))

    def check() -> list[dict]:
        if not run.curated.exists():
            raise FileNotFoundError(f"{run.curated}: missing; run `ssb curate` first")
        return read_checked(run.curated, check_curated, repair=False)

    inputs, outputs = [run.curated], [run.pairs, run.teach_attempts]
    with stage(run, "teach", parts, inputs, outputs, force=force, check=check) as st:
        if st is None:
            return run.stage_entry("teach")["counts"]
        curated = st.checked
        pairs_done = read_checked(run.pairs, check_id_only)
        attempts = read_checked(run.teach_attempts, check_attempt)
        kept_ids = {p["id"] for p in pairs_done}
        tries: dict[str, int] = {}
        for a in attempts:
            tries[a["id"]] = tries.get(a["id"], 0) + 1
        if attempts or pairs_done:
            st.say(f"[teach] resuming: {len(kept_ids)} pairs kept from {len(attempts)} earlier attempts")
        bad, limit = too_long(cfg, cfg.model, [c["teacher_messages"] for c in curated], tc.max_new_tokens)
        skipped = {curated[i]["id"] for i, _ in bad}
        if skipped:
            shown = ", ".join(repr(x) for x in sorted(skipped)[:10]) + (", ..." if len(skipped) > 10 else "")
            st.say(
                f"[teach] warning: left out {len(skipped)} question(s) whose hinted prompt + teach.max_new_tokens="
                f"{tc.max_new_tokens} exceeds the model's context of {limit} tokens: {shown}"
            )
        model = tok = engine = None
        with Verifier() as verifier, JsonlWriter(run.teach_attempts) as log, JsonlWriter(run.pairs) as pairs:
            logged = {(a["id"], a["attempt"]) for a in attempts}
            for p in pairs_done:  # a kill between the pair and its log line: log it now
                if (p["id"], p.get("attempt", 0)) not in logged:
                    log.write(_attempt_from_pair(p))
                    tries[p["id"]] = tries.get(p["id"], 0) + 1
            for round_ in range(tc.attempts):
                todo = [
                    c
                    for c in curated
                    if c["id"] not in kept_ids and c["id"] not in skipped and tries.get(c["id"], 0) <= round_
                ]
                if not todo:
                    continue
                if engine is None:
                    model, tok = load_from_config(cfg, generation=True)
                    engine = Engine(model, tok, batch_size=tc.batch_size)
                st.say(f"[teach] attempt {round_ + 1}/{tc.attempts}: {len(todo)} questions (T={tc.temperature})")
                params = SamplingParams(
                    temperature=tc.temperature,
                    top_k=tc.top_k,
                    top_p=tc.top_p,
                    max_new_tokens=tc.max_new_tokens,
                    seed=cfg.seed * 1000 + round_,
                )

                def save(i: int, comps, todo=todo, round_=round_, backend=engine.backend) -> None:
                    c, sol = todo[i], comps[0]
                    v = verifier.check_many([(sol.text, c["gold"])], policy=cfg.rollout.policy)[0]
                    keep = v.correct and sol.finish_reason == "stop"
                    if keep:  # the pair first: a kill before the log line below loses nothing
                        pairs.write(
                            {
                                "id": c["id"],
                                "question": c["question"],
                                "gold": c["gold"],
                                "teacher_messages": c["teacher_messages"],
                                "student_messages": c["student_messages"],
                                "solution": sol.text,
                                "solution_ids": list(sol.token_ids),
                                "extracted": v.extracted,
                                "attempt": round_,
                                "backend": backend,
                            }
                        )
                        kept_ids.add(c["id"])
                    log.write(
                        {
                            "id": c["id"],
                            "attempt": round_,
                            "text": sol.text,
                            "num_tokens": sol.num_tokens,
                            "finish_reason": sol.finish_reason,
                            "kept": keep,
                            "backend": backend,
                            **v.to_dict(),
                        }
                    )
                    tries[c["id"]] = tries.get(c["id"], 0) + 1

                engine.generate([c["teacher_messages"] for c in todo], n=1, params=params, callback=save)
        attempts = read_checked(run.teach_attempts, check_attempt)
        first = [a for a in attempts if a["attempt"] == 0]
        n_pairs = len(read_checked(run.pairs, check_id_only))
        st.counts.update(
            questions=len(curated),
            attempts=len(attempts),
            pairs=n_pairs,
            pass_rate_first_attempt=sum(a["correct"] for a in first) / max(1, len(first)),
            kept_share=n_pairs / max(1, len(curated)),
            truncated=sum(a["finish_reason"] == "length" for a in attempts),
            solution_tokens=sum(a["num_tokens"] for a in attempts if a["kept"]),
            too_long=len(skipped),
        )
        c = st.counts
        st.say(
            f"[teach] {n_pairs} pairs from {len(curated)} questions: teacher pass rate "
            f"{c['pass_rate_first_attempt']:.1%} on the first attempt, {c['truncated']} truncated"
        )
        return dict(st.counts)


def _attempt_from_pair(p: dict) -> dict:
    """The attempt-log line of a kept pair (written when a kill came between the pair and its log line)."""
    return {
        "id": p["id"],
        "attempt": p.get("attempt", 0),
        "text": p.get("solution", ""),
        "num_tokens": len(p.get("solution_ids") or ()),
        "finish_reason": "stop",
        "kept": True,
        "backend": p.get("backend"),
        "extracted": p.get("extracted"),
        "rule": None,
        "verdict": "correct",
        "correct": True,
        "policy": None,
        "restored": True,  # rebuilt from the pair: the kill came before this line was written
    }
