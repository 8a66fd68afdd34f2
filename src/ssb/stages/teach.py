"""Stage 3, `ssb teach`: the base model answers its own hinted prompt; verified answers become training pairs.

Up to `teach.attempts` tries per question. Every attempt is logged in RUN/teach_attempts.jsonl; a solution is
kept in RUN/pairs.jsonl only if it stopped on its own (not cut at max_new_tokens) and its answer verifies.
The solution is tokenised once, here: `solution_ids` are the generated ids including the end-of-turn token,
so later stages append them to either prompt without re-tokenising joined strings.

With `teach.target_pairs` set, the stage goes on drawing batches of fresh training questions until the run holds
that many pairs (or `teach.max_batches` is reached, or the data runs out; the reason is logged): see
`ssb.stages.target`. The manifest's teach counts then carry the yield funnel over all batches.

Crash safety: a kept pair is written (and fsynced) before its attempt is logged, so a kill between the two never
loses a verified pair; a resumed stage logs the attempt of any pair whose log line the kill prevented. A hinted
prompt too long for the model's context (question + two rollouts + the teacher's answer) is left out with a
warning naming it, and counted.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, closing
from pathlib import Path

from ssb import parallel
from ssb.config import Config
from ssb.files import JsonlWriter, read_jsonl
from ssb.lifecycle import stage
from ssb.models import generation_dtype_name
from ssb.records import check_attempt, check_curated, check_id_only, read_checked
from ssb.rundir import RunDir
from ssb.shards import rank_output


def teach(cfg: Config, run: RunDir, force: bool = False) -> dict:
    from ssb.engine.backends import reusing_generators
    from ssb.stages.target import draw_batches, funnel, funnel_line

    tc = cfg.teach
    teach_cfg = dataclasses.asdict(tc)
    outputs = [run.pairs, run.teach_attempts]
    if tc.target_pairs is None:  # off: the hash of runs from before the option stays the same
        del teach_cfg["target_pairs"], teach_cfg["max_batches"]
        parts: tuple = (cfg.model, teach_cfg, cfg.rollout.policy, cfg.seed, generation_dtype_name(cfg))
    else:  # further batches run rollout and curate too, so their settings count
        parts = (cfg.model, teach_cfg, cfg.rollout, cfg.data, cfg.curate, cfg.seed, generation_dtype_name(cfg))
        outputs.append(run.batches_dir)

    def check() -> list[dict]:
        if not run.curated.exists():
            raise FileNotFoundError(f"{run.curated}: missing; run `ssb curate` first")
        return read_checked(run.curated, check_curated, repair=False)

    with stage(run, "teach", parts, [run.curated], outputs, force=force, check=check, every_rank=True) as st:
        if st is None:
            return run.stage_entry("teach")["counts"]
        skipped = teach_questions(cfg, run, st.checked, st)
        batches, target_counts = [run], {}
        if tc.target_pairs is not None:
            with reusing_generators():  # one engine for every batch's rollout and teach, not two starts a batch
                more, target_counts = draw_batches(cfg, run, teach)
            batches += more
        attempts = [a for b in batches for a in read_checked(b.teach_attempts, check_attempt)]
        first = [a for a in attempts if a["attempt"] == 0]
        n_pairs = len(read_checked(run.pairs, check_id_only))
        n_curated = sum(len(read_jsonl(b.curated)) for b in batches)
        st.counts.update(
            questions=n_curated,
            attempts=len(attempts),
            pairs=n_pairs,
            pass_rate_first_attempt=sum(a["correct"] for a in first) / max(1, len(first)),
            kept_share=n_pairs / max(1, n_curated),
            truncated=sum(a["finish_reason"] == "length" for a in attempts),
            solution_tokens=sum(a["num_tokens"] for a in attempts if a["kept"]),
            funnel=funnel(batches, n_pairs),
            too_long=len(skipped),
        )
        st.counts.update(target_counts)  # with a target: target_pairs, target_reached, batches, shortfall_reason
        c = st.counts
        st.say(
            f"[teach] {n_pairs} pairs from {n_curated} questions: teacher pass rate "
            f"{c['pass_rate_first_attempt']:.1%} on the first attempt, {c['truncated']} truncated"
        )
        st.say(funnel_line(c))
        return dict(st.counts)


def teach_questions(cfg: Config, run: RunDir, curated: list[dict], st) -> set[str]:
    """Up to teach.attempts tries for each curated question without a kept pair, appending to the run's
    teach_attempts.jsonl and pairs.jsonl; resumes from what those files hold. Returns the ids left out because
    their hinted prompt does not fit the model's context. Under several processes each rank takes its share of
    the questions (`parallel.share`), all attempts of a question on the same rank, into its own shard files."""
    ids = [c["id"] for c in curated]
    attempt_order = [(i, a) for i in ids for a in range(cfg.teach.attempts)]
    with (
        rank_output(run.pairs, order=ids) as pairs_out,
        rank_output(run.teach_attempts, key=attempt_key, order=attempt_order) as log_out,
    ):
        return _teach_share(cfg, run, curated, pairs_out, log_out, st)


def attempt_key(rec: dict) -> tuple:
    return (rec.get("id"), rec.get("attempt"))


def _teach_share(cfg: Config, run: RunDir, curated: list[dict], pairs_out: Path, log_out: Path, st) -> set[str]:
    from ssb.engine import SamplingParams
    from ssb.engine.backends import make_generator
    from ssb.stages.inputs import too_long
    from ssb.verify import Verifier

    tc = cfg.teach
    mine = parallel.share([c["id"] for c in curated])  # once for all rounds: a question's attempts stay together
    pairs_done = [p for p in read_checked(run.pairs, check_id_only) if p["id"] in mine]
    attempts = [a for a in read_checked(run.teach_attempts, check_attempt) if a["id"] in mine]
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
    curated = [c for c in curated if c["id"] in mine]
    engine = None
    with (
        ExitStack() as open_engine,
        Verifier() as verifier,
        JsonlWriter(log_out) as log,
        JsonlWriter(pairs_out) as pairs,
    ):
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
                engine = make_generator(cfg, batch_size=tc.batch_size, manifest=(run, "teach"), log=st.say)
                open_engine.enter_context(closing(engine))  # closed when done (a vLLM engine holds memory)
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
            if hasattr(engine, "summary"):  # tokens/s and KV memory (other backends may not report them)
                st.say(f"[teach] {engine.summary()}")
    return skipped


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
