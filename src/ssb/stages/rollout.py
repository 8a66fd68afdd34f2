"""Stage 1, `ssb rollout`: K sampled answers per training question, each verified against the gold answer.

Writes RUN/data/train.jsonl (the questions) and RUN/rollouts.jsonl (one line per question, appended as soon as
its K samples are done, so a killed run resumes with the questions it had not finished; a line torn by the kill is
dropped and its question redone). The local data file is one of the stage's inputs: editing it reruns the stage.
"""

from __future__ import annotations

from collections import Counter
from contextlib import closing

from ssb import parallel
from ssb.config import Config
from ssb.data import data_files, question_records
from ssb.files import JsonlWriter, write_jsonl
from ssb.lifecycle import stage
from ssb.models import generation_dtype_name
from ssb.prompts import student_messages
from ssb.records import check_rollout_counted, read_checked
from ssb.rundir import RunDir
from ssb.shards import rank_output


def rollout(cfg: Config, run: RunDir, force: bool = False) -> dict:
    from ssb.stages.inputs import fitting_questions

    spec, rc = cfg.data.train, cfg.rollout
    questions = question_records(spec)  # a bad record is an error naming file, line and field (or skipped)

    def check() -> list[dict]:
        prompts = [student_messages(q["question"], rc.system_prompt) for q in questions]
        return fitting_questions(
            cfg,
            cfg.model,
            questions,
            prompts,
            rc.max_new_tokens,
            setting="rollout.max_new_tokens",
            spec=spec,
            spec_key="data.train",
        )

    outputs = [run.rollouts, run.train_data]
    parts = rollout_parts(cfg)
    with stage(run, "rollout", parts, data_files(spec), outputs, force=force, check=check, every_rank=True) as st:
        if st is None:
            return run.stage_entry("rollout")["counts"]
        questions = st.checked
        if parallel.current().is_main:
            write_jsonl(run.train_data, questions)
        with rank_output(run.rollouts, order=[q["id"] for q in questions]) as mine:
            _generate(cfg, run, questions, mine, st)
        records = read_checked(run.rollouts, check_rollout_counted)
        st.counts.update(rollout_counts(records))
        c = st.counts
        st.say(
            f"[rollout] {c['questions']} questions, {c['rollouts']} rollouts: {c['correct_share']:.1%} correct, "
            f"{c['unparsed']} unparsed, {c['truncated']} truncated, mean {c['mean_tokens']:.0f} tokens"
        )
        return dict(st.counts)


def _generate(cfg: Config, run: RunDir, questions: list[dict], out_path, st) -> None:
    """This rank's share of the questions not yet in RUN/rollouts.jsonl, appended to `out_path` one by one."""
    from ssb.engine import SamplingParams
    from ssb.engine.backends import make_generator
    from ssb.verify import Verifier

    rc = cfg.rollout
    done = {r["id"] for r in read_checked(run.rollouts, check_rollout_counted)}
    todo = [q for q in questions if q["id"] not in done]
    mine = parallel.share([q["id"] for q in todo])
    todo = [q for q in todo if q["id"] in mine]
    if done:
        st.say(f"[rollout] resuming: {len(done)} of {len(questions)} questions already done")
    if not todo:
        return
    engine = make_generator(cfg, batch_size=rc.batch_size, manifest=(run, "rollout"), log=st.say)
    params = SamplingParams(
        temperature=rc.temperature,
        top_k=rc.top_k,
        top_p=rc.top_p,
        max_new_tokens=rc.max_new_tokens,
        seed=cfg.seed,
    )
    prompts = [student_messages(q["question"], rc.system_prompt) for q in todo]
    # closed when done: a vLLM engine left to the garbage collector outlived the stage, memory and all
    with closing(engine), Verifier() as verifier, JsonlWriter(out_path) as out:

        def save(i: int, comps) -> None:
            q = todo[i]
            verdicts = verifier.check_many([(c.text, q["answer"]) for c in comps], policy=rc.policy)
            out.write(
                {
                    "id": q["id"],
                    "question": q["question"],
                    "gold": q["answer"],
                    "source": q["source"],
                    "backend": engine.backend,
                    "rollouts": [
                        {
                            "text": c.text,
                            "num_tokens": c.num_tokens,
                            "finish_reason": c.finish_reason,
                            **v.to_dict(),
                        }
                        for c, v in zip(comps, verdicts)
                    ],
                }
            )

        st.say(f"[rollout] {len(todo)} questions x {rc.k} samples (T={rc.temperature}, top-k {rc.top_k})")
        engine.generate(prompts, n=rc.k, params=params, callback=save)
    if hasattr(engine, "summary"):  # tokens/s and KV memory (other backends may not report them)
        st.say(f"[rollout] {engine.summary()}")


def rollout_parts(cfg: Config) -> tuple:
    """What the rollouts depend on (the manifest's config hash); `ssb experiment` uses it to derive a K=k run from
    the first k samples of a larger K."""
    return (cfg.model, cfg.data, cfg.rollout, cfg.seed, generation_dtype_name(cfg))


def rollout_counts(records: list[dict]) -> dict:
    verdicts = Counter(r["verdict"] for rec in records for r in rec["rollouts"])
    rolls = [r for rec in records for r in rec["rollouts"]]
    total = max(1, len(rolls))
    return {
        "questions": len(records),
        "rollouts": len(rolls),
        "correct": verdicts.get("correct", 0),
        "correct_share": verdicts.get("correct", 0) / total,
        "unparsed": verdicts.get("unparsed", 0),
        "timeout": verdicts.get("timeout", 0),
        "truncated": sum(r["finish_reason"] == "length" for r in rolls),
        "tokens": sum(r["num_tokens"] for r in rolls),
        "mean_tokens": sum(r["num_tokens"] for r in rolls) / total,
    }
