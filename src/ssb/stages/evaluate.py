"""Stage 6, `ssb eval`: pass@1 (with a confidence interval), pass@k and maj@n of a model on a benchmark.

`evaluate` prompts the model exactly as training does (cfg.rollout.system_prompt + the question, rendered with
the model's chat template), generates cfg.eval.n samples per problem (greedy when cfg.eval.temperature is 0),
verifies each with the cfg.eval.policy extraction policy and writes, in the output directory:

    samples.jsonl      one line per problem, appended as soon as its samples are verified (resumable):
                       id, question, gold, cluster (Example.cluster, else the id), correct (count),
                       samples [{text, num_tokens, finish_reason, extracted, rule, verdict, correct, policy}],
                       session, t (seconds into the session), backend
    eval_config.json   what the results depend on (model, data, sampling, policy, prompt, seed); a rerun with a
                       different one stops with an error unless `force`, which moves old outputs aside
    summary.json       written once every problem is done; see `build_summary`

Statistics (see ssb.metrics): pass@1 is the mean over problems of each problem's share of correct samples. Its
95% CI is the Wilson score interval when n = 1 (one Bernoulli trial per problem), and for n > 1 the normal
approximation mean +- 1.96 s/sqrt(m) over the m per-problem shares (falling back to Wilson when all shares are
equal, where the normal interval has zero width). Paired tests between models are `ssb compare` (stages/compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from contextlib import closing, nullcontext
from pathlib import Path

from ssb import parallel
from ssb.config import Config, DatasetSpec, validate
from ssb.data import BENCHMARKS, Example, load_examples
from ssb.files import JsonlWriter, atomic_write_json, directory_lock, file_digest, read_json_object, read_jsonl
from ssb.memory import PeakRSS
from ssb.models import generation_dtype_name
from ssb.rundir import EVAL_CONFIG, SAMPLES, SUMMARY, RunDir, benchmark_tag, move_aside
from ssb.shards import fold, rank_output
from ssb.summary import EvalError, build_summary, detail_line, result_line

BENCHMARK_CHOICES = ("gsm8k", "math500", "aime24", "amc23", "arith")


# ---------------------------------------------------------------------------------------------- inputs


def dataset_spec(cfg: Config, benchmark: str | None, data_file: str | None = None) -> DatasetSpec:
    """The DatasetSpec for a benchmark name (test split; limit/offset from cfg.eval.data), or cfg.eval.data as
    is when benchmark is None (with `data_file` as its source when given)."""
    base = cfg.eval.data
    if benchmark is None:
        return dataclasses.replace(base, source=str(data_file)) if data_file else base
    if benchmark == "arith":
        if data_file:
            raise EvalError(
                "the arith benchmark is generated, not read from a file: drop --data, or leave out "
                "--benchmark to evaluate on the file"
            )
        return DatasetSpec(source="arith", split="test", level=base.level, limit=base.limit, offset=base.offset)
    if benchmark in BENCHMARKS:
        return DatasetSpec(
            source=benchmark, split="test", limit=base.limit, offset=base.offset, skip_bad_records=base.skip_bad_records
        )
    raise EvalError(
        f"unknown benchmark {benchmark!r} (choose from {', '.join(BENCHMARK_CHOICES)}, or leave it "
        f"out to use eval.data, e.g. a local JSONL file)"
    )


def _model_identity(spec: str) -> dict:
    """The model spec plus a cheap signature of local weights, so retrained weights at the same path are noticed:
    a LoRA adapter's files are hashed (small); a full model directory contributes file names, sizes and mtimes."""
    path = Path(spec).expanduser()
    if not path.exists():
        return {"model": spec, "weights": None}  # an alias or Hub id: the name is the identity
    from ssb.models import adapter_info

    info = adapter_info(path)
    if info is not None:
        return {"model": str(path.resolve()), "weights": "adapter:" + file_digest(info["adapter"])}
    stats = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.suffix in (".safetensors", ".bin", ".json")
    )
    return {"model": str(path.resolve()), "weights": hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}


def eval_settings(
    cfg: Config, model: str, benchmark: str, spec: DatasetSpec, data_file: str | None, examples: list[Example]
) -> dict:
    """Everything the samples depend on; must match to resume into existing outputs."""
    ec = cfg.eval
    data_hash = hashlib.sha256(json.dumps([(e.id, e.question, e.answer) for e in examples]).encode())
    return {
        **_model_identity(model),
        "benchmark": benchmark,
        "data": dataclasses.asdict(spec),
        "data_file": str(data_file) if data_file else None,
        "data_hash": data_hash.hexdigest()[:16],
        "n": ec.n,
        "temperature": ec.temperature,
        "top_k": ec.top_k,
        "top_p": ec.top_p,
        "max_new_tokens": ec.max_new_tokens,
        "policy": ec.policy,
        "system_prompt": cfg.rollout.system_prompt,
        "seed": cfg.seed,
        "generation_dtype": generation_dtype_name(cfg),
    }


def _read_json(path: Path) -> dict:
    """An eval output's JSON file (eval_config.json, summary.json); errors name it."""
    try:
        return read_json_object(path, hint="; pass --force to start over")
    except ValueError as e:
        raise EvalError(str(e)) from None


def _prepare_outputs(out: Path, settings: dict, ids: set[str], force: bool) -> dict[str, dict]:
    """Check existing outputs against `settings` (or move them aside with `force`); finished records by id.
    Everything is checked before eval_config.json is written, so outputs that do not match stay as they were."""
    files = [out / SAMPLES, out / SUMMARY, out / EVAL_CONFIG]
    if force:
        for p in files:
            if p.exists():
                move_aside(p)
    records = read_jsonl(out / SAMPLES, lines=True)
    if (out / EVAL_CONFIG).exists():
        old = _read_json(out / EVAL_CONFIG)
        new = json.loads(json.dumps(settings))
        diff = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
        if diff:
            raise EvalError(
                f"{out}: existing results were made with a different eval setup ({'; '.join(diff)}). "
                f"Pass --force to move them aside and start over, or choose another --output-dir"
            )
    elif records or (out / SUMMARY).exists():
        raise EvalError(
            f"{out}: has eval outputs but no {EVAL_CONFIG} to check them against; pass --force to move "
            f"them aside, or choose another --output-dir"
        )
    done: dict[str, dict] = {}
    for line, r in records:
        samples = r.get("samples") if isinstance(r, dict) else None
        if (
            not isinstance(r, dict)
            or r.get("id") not in ids
            or r["id"] in done
            or not isinstance(samples, list)
            or len(samples) != settings["n"]
            or not all(isinstance(x, dict) for x in samples)
        ):
            raise EvalError(
                f"{out / SAMPLES}:{line}: record {r.get('id') if isinstance(r, dict) else r!r} is unknown, repeated "
                f"or malformed (field 'id' or 'samples'); pass --force to start over"
            )
        done[r["id"]] = r
    atomic_write_json(out / EVAL_CONFIG, settings)
    return done


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate(
    cfg: Config,
    model: str,
    benchmark: str | None,
    output_dir: Path,
    *,
    data_file: str | None = None,
    force: bool = False,
) -> dict:
    """Evaluate `model` (alias, Hub id, local dir, LoRA adapter or ssb run dir) on `benchmark` (gsm8k, math500,
    aime24, amc23, arith, or None for cfg.eval.data); `data_file` replaces where the records come from.
    Resumes a killed run; returns the summary (also written to output_dir/summary.json)."""
    from ssb.prompts import student_messages
    from ssb.stages.inputs import fitting_questions

    ec = cfg.eval
    spec = dataset_spec(cfg, benchmark, data_file)
    examples = load_examples(spec, None if benchmark is None else data_file)
    prompts = [student_messages(e.question, cfg.rollout.system_prompt) for e in examples]
    examples = fitting_questions(
        cfg, model, examples, prompts, ec.max_new_tokens, setting="eval.max_new_tokens", spec=spec, spec_key="eval.data"
    )
    name = benchmark or benchmark_tag(spec.source)
    settings = eval_settings(cfg, model, name, spec, data_file, examples)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    main = parallel.current().is_main
    say = print if main else (lambda *a, **k: None)  # one voice across the ranks
    # another ssb process evaluating into the same directory (seeds of one experiment sharing the base model's
    # evaluation) finishes first; then this one finds the problems done. Rank 0 decides for the ranks of a launch.
    lock = directory_lock(out, f"[eval] another ssb process is evaluating into {out}") if main else nullcontext()
    with lock:
        done, session = _prepared(out, settings, examples, force)
        if len(done) == len(examples) and (out / SUMMARY).exists():
            summary = _read_json(out / SUMMARY)
            say(f"[eval] {out}: already done (--force reruns it)", flush=True)
            say(result_line(summary), flush=True)
            return summary
        todo = [e for e in examples if e.id not in done]
        rss = PeakRSS()  # this evaluation's peak resident memory (the report shows it)
        if todo:
            if done:
                say(f"[eval] resuming: {len(done)} of {len(examples)} problems already done", flush=True)
            if ec.temperature == 0 and ec.n > 1:
                say(
                    f"[eval] note: temperature 0 is greedy, so the n={ec.n} samples per problem are identical",
                    flush=True,
                )
            with rank_output(out / SAMPLES, order=[e.id for e in examples]) as mine, rss:
                ids = parallel.share([e.id for e in todo])  # this rank's part (all of it in one process)
                if ids:
                    _generate(cfg, model, [e for e in todo if e.id in ids], mine, session)
        summary = None
        if main:
            by_id = {r["id"]: r for r in read_jsonl(out / SAMPLES)}
            summary = build_summary([by_id[e.id] for e in examples], settings)
            summary["config"] = {**settings, "batch_size": ec.batch_size, "device": cfg.device, "dtype": cfg.dtype}
            if todo:
                summary["peak_rss_bytes"] = rss.peak_bytes
            atomic_write_json(out / SUMMARY, summary)
            print(result_line(summary), flush=True)
            print(detail_line(summary, out), flush=True)
        return parallel.broadcast(summary)


def _prepared(out: Path, settings: dict, examples: list[Example], force: bool) -> tuple[set[str], int]:
    """(ids of the problems already done, this session's number), decided by rank 0 (`_prepare_outputs`, after
    folding in the per-rank sample files a killed multi-process evaluation left) and shared with the others."""
    decision = None
    if parallel.current().is_main:
        try:
            fold(out / SAMPLES, order=[e.id for e in examples])
            done = _prepare_outputs(out, settings, {e.id for e in examples}, force)
        except BaseException as e:  # tell the other ranks instead of leaving them waiting
            parallel.broadcast({"error": str(e)})
            raise
        session = 1 + max((r.get("session", 0) for r in done.values()), default=-1)
        decision = {"done": sorted(done), "session": session}
    decision = parallel.broadcast(decision)
    if "error" in decision:
        raise EvalError(f"rank 0 stopped: {decision['error']}")
    return set(decision["done"]), decision["session"]


def _generate(cfg: Config, model: str, todo: list[Example], samples_path: Path, session: int) -> None:
    from ssb.engine import SamplingParams
    from ssb.engine.backends import make_generator
    from ssb.prompts import student_messages
    from ssb.verify import Verifier

    ec = cfg.eval
    engine = make_generator(cfg, model, batch_size=ec.batch_size, progress=True, log=print)
    # A fixed seed: the engine keys each sample's random stream on (seed, prompt, index), so a resumed run
    # draws exactly the samples an uninterrupted one would have.
    params = SamplingParams(
        temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p, max_new_tokens=ec.max_new_tokens, seed=cfg.seed
    )
    prompts = [student_messages(e.question, cfg.rollout.system_prompt) for e in todo]
    mode = "greedy" if ec.temperature == 0 else f"T={ec.temperature}, top-k {ec.top_k}, top-p {ec.top_p}"
    print(f"[eval] {model}: {len(todo)} problems x {ec.n} samples ({mode}, max {ec.max_new_tokens} tokens)", flush=True)
    t0 = time.time()
    # closed when done: a vLLM engine left to the garbage collector outlived the evaluation, memory and all
    with closing(engine), Verifier() as verifier, JsonlWriter(samples_path) as writer:

        def save(i: int, comps) -> None:
            ex = todo[i]
            verdicts = verifier.check_many([(c.text, ex.answer) for c in comps], policy=ec.policy)
            samples = [
                {"text": c.text, "num_tokens": c.num_tokens, "finish_reason": c.finish_reason, **v.to_dict()}
                for c, v in zip(comps, verdicts)
            ]
            writer.write(
                {
                    "id": ex.id,
                    "question": ex.question,
                    "gold": ex.answer,
                    "cluster": ex.cluster or ex.id,
                    "correct": sum(s["correct"] for s in samples),
                    "samples": samples,
                    "session": session,
                    "t": round(time.time() - t0, 3),
                    "backend": engine.backend,
                }
            )

        engine.generate(prompts, ec.n, params, callback=save)
    if hasattr(engine, "summary"):  # tokens/s and KV memory of the run (other backends may not report them)
        print(f"[eval] {engine.summary()}", flush=True)


# ---------------------------------------------------------------------------------------------- CLI


def _limit(text: str) -> int:
    if text.lower() in ("all", "none"):
        return -1
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--limit must be >= 1 or 'all'")
    return value


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Options of `ssb eval` (the caller adds --config, --set, --run-dir and --force). Unset options keep the
    config's values (eval.* keys); --limit 'all' lifts eval.data.limit (default 200)."""
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--model",
        help="model to evaluate: alias, Hub id, local dir, LoRA adapter or ssb run dir "
        "(default: the run dir's trained adapter with --run-dir, else the config's model)",
    )
    g.add_argument(
        "--benchmark",
        choices=BENCHMARK_CHOICES,
        help="benchmark (test split); default: eval.data, e.g. a local JSONL with --data",
    )
    g.add_argument(
        "--data",
        help="local copy of the benchmark's records (e.g. gsm8k_test.jsonl), or any JSONL "
        "file of questions and answers when no --benchmark is given",
    )
    g.add_argument("--n", type=int, help="samples per problem (eval.n)")
    g.add_argument("--temperature", type=float, help="0 = greedy (eval.temperature)")
    g.add_argument("--top-k", type=int, help="eval.top_k")
    g.add_argument("--top-p", type=float, help="eval.top_p")
    g.add_argument("--max-new-tokens", type=int, help="eval.max_new_tokens")
    g.add_argument("--batch-size", type=int, help="eval.batch_size")
    g.add_argument("--limit", type=_limit, help="evaluate at most this many problems, or 'all' (eval.data.limit)")
    g.add_argument("--offset", type=int, help="skip this many problems first (eval.data.offset)")
    g.add_argument("--level", type=int, help="arith difficulty 1-3 (eval.data.level)")
    g.add_argument("--policy", choices=("boxed", "lenient"), help="answer extraction policy (eval.policy)")
    g.add_argument(
        "--output-dir",
        help="where samples.jsonl and summary.json go "
        "(default with --run-dir: RUN/eval/<base|ssb|model name>/<benchmark>)",
    )


def eval_from_args(cfg: Config, args: argparse.Namespace) -> int:
    """Apply `add_eval_args` options to cfg.eval and run `evaluate`. Returns the exit code (0)."""
    ec, data = cfg.eval, cfg.eval.data
    for opt, key in (
        ("n", "n"),
        ("temperature", "temperature"),
        ("top_k", "top_k"),
        ("top_p", "top_p"),
        ("max_new_tokens", "max_new_tokens"),
        ("batch_size", "batch_size"),
        ("policy", "policy"),
    ):
        if getattr(args, opt, None) is not None:
            setattr(ec, key, getattr(args, opt))
    for opt in ("offset", "level"):
        if getattr(args, opt, None) is not None:
            setattr(data, opt, getattr(args, opt))
    if getattr(args, "limit", None) is not None:
        data.limit = None if args.limit == -1 else args.limit
    validate(cfg)
    run_dir = getattr(args, "run_dir", None)
    model, tag = args.model, None
    if model is None and run_dir and RunDir(run_dir).adapter_dir.exists():
        model, tag = str(RunDir(run_dir).adapter_dir), "ssb"
    elif model is None:
        model, tag = cfg.model, "base"
    out = args.output_dir
    if out is None:
        if not run_dir:
            raise EvalError("ssb eval needs --output-dir (or --run-dir, to write into RUN/eval/...)")
        tag = tag or Path(model.rstrip("/")).name
        bench = args.benchmark or benchmark_tag(args.data or data.source)
        out = RunDir(run_dir).eval_dir(tag, bench)  # directory-safe parts, whatever the source string
    evaluate(cfg, model, args.benchmark, Path(out), data_file=args.data, force=getattr(args, "force", False))
    return 0
