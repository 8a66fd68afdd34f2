"""Malformed inputs thrown at every verb: data files, YAML configs, --set overrides, saved configs, the artifacts one
stage hands the next, adapters, eval outputs and answers.

Each case runs the verb in process (`ssb.cli.main`, the same code as `python -m ssb`) and asserts what
docs/security.md promises: a non-zero exit, no Python traceback, a message naming the file and the line and the
field (or the config key), and no change to anything already on disk (every file under the case's directory is
hashed before and after). Every case fails before a model's weights are loaded, so the module runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ssb.cli import main
from ssb.config import load_config, save_config
from ssb.files import JsonlWriter

GOOD = [
    {"id": "a", "question": "What is 1 + 1?", "answer": "2"},
    {"id": "b", "question": "What is 2 + 2?", "answer": "4"},
    {"id": "c", "question": "What is 3 + 3?", "answer": "6"},
]
SYSTEM = "You are a helpful math tutor."


def _jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def _rollout(i: int) -> dict:
    q = GOOD[i]
    rolls = [
        {"text": f"It is {q['answer']}.", "num_tokens": 4, "finish_reason": "stop", "extracted": q["answer"]},
        {"text": "It is 9.", "num_tokens": 4, "finish_reason": "stop", "extracted": "9"},
    ]
    rolls[0].update(verdict="correct", rule="answer_is", correct=True, policy="lenient")
    rolls[1].update(verdict="incorrect", rule="answer_is", correct=False, policy="lenient")
    return {"id": q["id"], "question": q["question"], "gold": q["answer"], "source": "q", "rollouts": rolls}


def _curated(i: int) -> dict:
    q = GOOD[i]
    return {
        "id": q["id"],
        "question": q["question"],
        "gold": q["answer"],
        "teacher_messages": _messages(q["question"] + " Hint: it is " + q["answer"]),
        "student_messages": _messages(q["question"]),
    }


def _pair(i: int) -> dict:
    return {**_curated(i), "solution": "It is 2.", "solution_ids": [5, 6, 7, 2], "extracted": "2", "attempt": 0}


def _summary() -> dict:
    return {
        "model": "m",
        "benchmark": "q",
        "n": 1,
        "problems": 3,
        "pass@1": 0.5,
        "pass@1_ci": {"low": 0.1, "high": 0.9, "level": 0.95},
        "maj@n": 0.5,
        "mean_tokens": 4.0,
        "truncated_share": 0.0,
        "wall_seconds": 1.0,
    }


def _samples() -> list[dict]:
    s = {"text": "2", "num_tokens": 1, "finish_reason": "stop", "extracted": "2", "verdict": "correct"}
    return [{"id": q["id"], "correct": 1, "samples": [{**s, "correct": True}]} for q in GOOD]


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_model_dir):
    """A world of well-formed inputs and outputs: data, a run directory with every stage's artifact and a saved
    config, a LoRA adapter on the tiny model, and eval output directories."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fuzz-template")
    (root / "q.jsonl").write_text(_jsonl(GOOD))
    run = root / "run"
    run.mkdir()
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train.source={root / 'q.jsonl'}", "logits.top_k=4"])
    save_config(cfg, run / "config.yaml")
    (run / "rollouts.jsonl").write_text(_jsonl(_rollout(i) for i in range(3)))
    (run / "curated.jsonl").write_text(_jsonl(_curated(i) for i in range(3)))
    (run / "pairs.jsonl").write_text(_jsonl(_pair(i) for i in range(3)))
    (run / "metrics.jsonl").write_text(_jsonl({"step": s, "loss": 1.0 / s} for s in (1, 2)))
    ev = run / "eval" / "base" / "q"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps(_summary()))
    (ev / "samples.jsonl").write_text(_jsonl(_samples()))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = root / "adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(adapter)
    (adapter / "ssb_base.json").write_text(json.dumps({"model": str(tiny_model_dir), "trust_remote_code": False}))
    # a finished eval to resume into, made by `ssb eval` itself (its eval_config.json is what a rerun computes);
    # the samples are scripted, so no model generates and no verifier starts
    import ssb.stages.evaluate as ev

    def scripted(cfg, model, todo, samples_path, session):
        with JsonlWriter(samples_path) as w:
            for e in todo:
                s = {"text": "2", "num_tokens": 1, "finish_reason": "stop", "extracted": "2", "rule": "whole"}
                w.write(
                    {
                        "id": e.id,
                        "question": e.question,
                        "gold": e.answer,
                        "correct": 0,
                        "samples": [{**s, "verdict": "incorrect", "correct": False, "policy": "lenient"}],
                        "session": 0,
                        "t": 0.1,
                    }
                )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "_generate", scripted)
        assert main(_eval_argv(root, tiny_model_dir) + ["--max-new-tokens", "2"]) == 0
    assert (root / "evalout" / "eval_config.json").exists()
    return root


def _eval_argv(root: Path, model) -> list[str]:
    data, out = str(root / "q.jsonl"), str(root / "evalout")
    return ["eval", "--run-dir", str(root / "new"), "--model", str(model), "--data", data, "--output-dir", out]


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# Each case: (mutation of the world, argv, the text the error must contain). In the strings, {root} is the case's
# directory and {model} the tiny model; mutations write files relative to {root}.
Q2 = '{"id": "b", "question": "What is 2 + 2?", "answer": '  # line 2 of the data file, to be completed
NESTED = "[" * 100_000 + "]" * 100_000


def _data_line2(line: str | bytes):
    def mutate(root: Path) -> None:
        good = _jsonl(GOOD).splitlines(keepends=True)
        body = line if isinstance(line, bytes) else line.encode()
        (root / "q.jsonl").write_bytes(good[0].encode() + body + b"\n" + good[2].encode())

    return mutate


def _write(rel: str, content: str | bytes):
    def mutate(root: Path) -> None:
        path = root / rel
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)

    return mutate


def _edit_json(rel: str, edit):
    def mutate(root: Path) -> None:
        path = root / rel
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return mutate


def _edit_line1(rel: str, edit):
    def mutate(root: Path) -> None:
        path = root / rel
        lines = path.read_text().splitlines()
        rec = json.loads(lines[0])
        edit(rec)
        path.write_text(_jsonl([json.dumps(rec)] + lines[1:]))

    return mutate


def _eval_here(root: Path) -> None:
    """Point the copied eval_config.json at this copy's data file, so a resume into it gets past the setup check."""
    path = root / "evalout" / "eval_config.json"
    old_root = str(Path(json.loads(path.read_text())["data_file"]).parent)
    path.write_text(path.read_text().replace(old_root, str(root)))


def _rm(rel: str):
    return lambda root: (root / rel).unlink()


def _both(*mutations):
    def mutate(root: Path) -> None:
        for m in mutations:
            m(root)

    return mutate


ROLLOUT = ["rollout", "--run-dir", "{root}/new", "--set", "model={model}", "--set", "data.train.source={root}/q.jsonl"]
CFG_RUN = ["--run-dir", "{root}/new", "--set", "model={model}"]
DATA = "{root}/q.jsonl:2"
RUN = "{root}/run"
EVAL = ["eval", "--run-dir", "{root}/new", "--data", "{root}/q.jsonl", "--output-dir"]  # + DIR, then --model M

CASES = {
    # ------------------------------------------------------------------ training data (rollout, grpo, run, eval)
    "data-invalid-json": (_data_line2(Q2), ROLLOUT, [DATA, "not valid JSON"]),
    "data-not-an-object": (_data_line2("[1, 2]"), ROLLOUT, [DATA, "expected a JSON object"]),
    "data-missing-question": (_data_line2('{"id": "b", "answer": "4"}'), ROLLOUT, [DATA, "'question'"]),
    "data-question-a-number": (_data_line2('{"id": "b", "question": 5, "answer": "4"}'), ROLLOUT, [DATA, "'question'"]),
    "data-empty-id": (_data_line2('{"id": "", "question": "q?", "answer": "4"}'), ROLLOUT, [DATA, "field 'id'"]),
    "data-id-an-object": (_data_line2('{"id": {}, "question": "q?", "answer": "4"}'), ROLLOUT, [DATA, "field 'id'"]),
    "data-duplicate-id": (_data_line2('{"id": "a", "question": "q?", "answer": "4"}'), ROLLOUT, [DATA, "'id'"]),
    "data-not-utf8": (_data_line2(Q2.encode() + b'"\xff\xfe"}'), ROLLOUT, [DATA, "UTF-8"]),
    "data-unbalanced-gold": (_data_line2(Q2 + '"\\\\frac{1}{2"}'), ROLLOUT, [DATA, "'answer'"]),
    "data-null-gold": (_data_line2(Q2 + "null}"), ROLLOUT, [DATA, "'answer'"]),
    "data-nested-too-deeply": (_data_line2(Q2 + NESTED + "}"), ROLLOUT, [DATA, "nested too deeply"]),
    "data-empty-file": (_write("q.jsonl", ""), ROLLOUT, ["{root}/q.jsonl", "no usable records"]),
    "data-a-directory": (
        _both(_rm("q.jsonl"), lambda r: (r / "q.jsonl").mkdir()),
        ROLLOUT,
        ["{root}/q.jsonl", "is a directory"],
    ),
    "data-grpo": (_data_line2("[1]"), ["grpo"] + ROLLOUT[1:], [DATA, "expected a JSON object"]),
    "data-run": (_data_line2('{"id": "b"}'), ["run"] + ROLLOUT[1:], [DATA, "'question'"]),
    "data-eval": (
        _data_line2(Q2 + '""}'),
        EVAL + ["{root}/out", "--model", "{model}"],
        [DATA, "'answer'"],
    ),
    # ------------------------------------------------------------------ YAML config files
    "yaml-unclosed": (
        _write("c.yaml", "seed: 1\nrollout: {k: 2\n"),
        ["rollout", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml:3:", "not valid YAML"],
    ),
    "yaml-tab": (
        _write("c.yaml", "rollout:\n\tk: 2\n"),
        ["curate", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml:2:", "not valid YAML"],
    ),
    "yaml-a-list": (
        _write("c.yaml", "- a\n- b\n"),
        ["rollout", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "mapping"],
    ),
    "yaml-unknown-key": (
        _write("c.yaml", "rollout: {bogus: 1}\n"),
        ["teach", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "'rollout.bogus'"],
    ),
    "yaml-wrong-type": (
        _write("c.yaml", "rollout: {k: many}\n"),
        ["rollout", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "'rollout.k'"],
    ),
    "yaml-nan": (
        _write("c.yaml", "teach: {temperature: .nan}\n"),
        ["logits", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "'teach.temperature'"],
    ),
    "yaml-not-utf8": (
        _write("c.yaml", b"seed: 1\nrollout: {k: \xff}\n"),
        ["run", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml:2", "UTF-8"],
    ),
    "yaml-section-a-number": (
        _write("c.yaml", "train: 5\n"),
        ["train", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "'train'"],
    ),
    "yaml-unknown-preset": (
        _write("c.yaml", "preset: ../../etc\n"),
        ["grpo", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml", "'preset'"],
    ),
    "yaml-nested-too-deeply": (
        _write("c.yaml", "seed: " + "[" * 600 + "]" * 600 + "\n"),
        ["rollout", "--config", "{root}/c.yaml"] + CFG_RUN,
        ["{root}/c.yaml"],
    ),
    "yaml-eval": (
        _write("c.yaml", "eval: {n: 0}\n"),
        ["eval", "--config", "{root}/c.yaml", "--output-dir", "{root}/o"],
        ["{root}/c.yaml", "'eval.n'"],
    ),
    # ------------------------------------------------------------------ --set overrides
    "set-no-equals": (None, ["rollout", "--set", "rollout.k"] + CFG_RUN, ["'rollout.k'", "key.sub=value"]),
    "set-empty-key": (None, ["curate", "--set", "=3"] + CFG_RUN, ["'=3'", "empty key"]),
    "set-negative-seed": (None, ["teach", "--set", "seed=-1"] + CFG_RUN, ["'seed'", ">= 0"]),
    "set-nan": (None, ["run", "--set", "rollout.temperature=.nan"] + CFG_RUN, ["'rollout.temperature'", "finite"]),
    "set-infinite-lr": (None, ["train", "--set", "train.learning_rate=.inf"] + CFG_RUN, ["'train.learning_rate'"]),
    "set-negative-limit": (None, ["rollout", "--set", "data.train.limit=-3"] + CFG_RUN, ["'data.train.limit'"]),
    "set-negative-alpha": (None, ["train", "--set", "train.lora_alpha=-16"] + CFG_RUN, ["'train.lora_alpha'"]),
    "set-list-for-int": (None, ["rollout", "--set", "rollout.k=[1, 2]"] + CFG_RUN, ["'rollout.k'"]),
    "set-unknown-key": (None, ["logits", "--set", "logits.kk=1"] + CFG_RUN, ["'logits.kk'"]),
    "set-eval-nan": (None, EVAL + ["{root}/o", "--temperature", "nan"], ["'eval.temperature'"]),
    # ------------------------------------------------------------------ the saved config of a run directory
    "saved-config-garbage": (
        _write("run/config.yaml", "{{{\n"),
        ["curate", "--run-dir", RUN],
        ["{root}/run/config.yaml:2:", "not valid YAML"],
    ),
    "saved-config-bad-value": (
        _write("run/config.yaml", "rollout: {k: 0}\n"),
        ["teach", "--run-dir", RUN],
        ["{root}/run/config.yaml", "'rollout.k'"],
    ),
    # ------------------------------------------------------------------ what one stage hands the next
    "rollouts-corrupt-line": (
        _write("run/rollouts.jsonl", _jsonl([_rollout(0), "{garbage", _rollout(2)])),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:2", "not valid JSON"],
    ),
    "rollouts-not-utf8": (
        _write("run/rollouts.jsonl", json.dumps(_rollout(0)).encode()[:-2] + b'\xff"}\n' + b"{}\n"),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "UTF-8"],
    ),
    "rollouts-missing-field": (
        _edit_line1("run/rollouts.jsonl", lambda r: r.pop("rollouts")),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "'rollouts'"],
    ),
    "rollouts-not-a-list": (
        _edit_line1("run/rollouts.jsonl", lambda r: r.update(rollouts="many")),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "'rollouts'"],
    ),
    "rollouts-bad-verdict": (
        _edit_line1("run/rollouts.jsonl", lambda r: r["rollouts"][1].update(verdict="ok")),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "'rollouts[1].verdict'"],
    ),
    "rollouts-wrong-without-answer": (
        _edit_line1("run/rollouts.jsonl", lambda r: r["rollouts"][1].update(extracted=None)),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "'rollouts[1].extracted'"],
    ),
    "rollouts-bad-gold": (
        _edit_line1("run/rollouts.jsonl", lambda r: r.update(gold="$$")),
        ["curate", "--run-dir", RUN],
        ["{root}/run/rollouts.jsonl:1", "'gold'"],
    ),
    "curated-missing-messages": (
        _edit_line1("run/curated.jsonl", lambda r: r.pop("teacher_messages")),
        ["teach", "--run-dir", RUN],
        ["{root}/run/curated.jsonl:1", "'teacher_messages'"],
    ),
    "curated-bad-message": (
        _edit_line1("run/curated.jsonl", lambda r: r["student_messages"][1].update(content=5)),
        ["teach", "--run-dir", RUN],
        ["{root}/run/curated.jsonl:1", "'student_messages[1]'"],
    ),
    "curated-a-list": (
        _write("run/curated.jsonl", "[1]\n"),
        ["teach", "--run-dir", RUN],
        ["{root}/run/curated.jsonl:1", "expected a JSON object"],
    ),
    "pairs-bad-ids-logits": (
        _edit_line1("run/pairs.jsonl", lambda r: r.update(solution_ids=[1, -2])),
        ["logits", "--run-dir", RUN],
        ["{root}/run/pairs.jsonl:1", "'solution_ids'"],
    ),
    "pairs-bad-ids-train": (
        _edit_line1("run/pairs.jsonl", lambda r: r.update(solution_ids="1 2 3")),
        ["train", "--run-dir", RUN],
        ["{root}/run/pairs.jsonl:1", "'solution_ids'"],
    ),
    "pairs-empty-id": (
        _edit_line1("run/pairs.jsonl", lambda r: r.update(id=" ")),
        ["train", "--run-dir", RUN, "--set", "train.kd_weight=0", "--set", "train.ce_weight=1"],
        ["{root}/run/pairs.jsonl:1", "'id'"],
    ),
    "manifest-garbage": (
        _write("run/manifest.json", '{"stages": {'),
        ["curate", "--run-dir", RUN],
        ["{root}/run/manifest.json:1", "not valid JSON"],
    ),
    "manifest-wrong-shape": (
        _write("run/manifest.json", '{"stages": []}'),
        ["teach", "--run-dir", RUN],
        ["{root}/run/manifest.json", "'stages'"],
    ),
    # ------------------------------------------------------------------ adapters handed to `ssb eval`
    "adapter-base-json-garbage": (
        _write("adapter/ssb_base.json", "{model"),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["{root}/adapter/ssb_base.json", "line 1"],
    ),
    "adapter-base-without-model": (
        _write("adapter/ssb_base.json", '{"trust_remote_code": true}'),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["{root}/adapter/ssb_base.json", "field 'model'"],
    ),
    "adapter-base-missing": (
        _write("adapter/ssb_base.json", '{"model": "/no/such/base"}'),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["/no/such/base", "not found"],
    ),
    "adapter-config-garbage": (
        _both(_rm("adapter/ssb_base.json"), _write("adapter/adapter_config.json", "[1, 2")),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["{root}/adapter/adapter_config.json", "line 1"],
    ),
    "adapter-config-without-base": (
        _both(_rm("adapter/ssb_base.json"), _write("adapter/adapter_config.json", '{"r": 2}')),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["{root}/adapter/adapter_config.json", "field 'base_model_name_or_path'"],
    ),
    "adapter-weights-garbage": (
        _write("adapter/adapter_model.safetensors", b"not safetensors"),
        EVAL + ["{root}/o", "--model", "{root}/adapter"],
        ["{root}/adapter/adapter_model.safetensors"],
    ),
    # ------------------------------------------------------------------ eval outputs to resume into
    "eval-config-garbage": (
        _write("evalout/eval_config.json", "{"),
        EVAL + ["{root}/evalout", "--model", "{model}", "--max-new-tokens", "2"],
        ["{root}/evalout/eval_config.json:1", "not valid JSON"],
    ),
    "eval-samples-malformed": (
        _both(_eval_here, _edit_line1("evalout/samples.jsonl", lambda r: r.update(samples="x"))),
        EVAL + ["{root}/evalout", "--model", "{model}", "--max-new-tokens", "2"],
        ["{root}/evalout/samples.jsonl:1", "'samples'"],
    ),
    # ------------------------------------------------------------------ compare and report
    "compare-summary-garbage": (
        _write("run/eval/base/q/summary.json", "{\n"),
        ["compare", "{root}/run/eval/base/q"],
        ["{root}/run/eval/base/q/summary.json:2", "not valid JSON"],
    ),
    "compare-summary-without-ci": (
        _edit_json("run/eval/base/q/summary.json", lambda s: s.pop("pass@1_ci")),
        ["compare", "{root}/run/eval/base/q"],
        ["{root}/run/eval/base/q/summary.json", "'pass@1_ci'"],
    ),
    "compare-samples-bad": (
        _edit_line1("run/eval/base/q/samples.jsonl", lambda r: r.update(correct="1")),
        ["compare", "{root}/run/eval/base/q"],
        ["{root}/run/eval/base/q/samples.jsonl:1", "'correct'"],
    ),
    "report-metrics-corrupt": (
        _write("run/metrics.jsonl", '{"step": 1}\n{\n{"step": 3}\n'),
        ["report", RUN],
        ["{root}/run/metrics.jsonl:2"],
    ),
    "report-metrics-bad-step": (
        _write("run/metrics.jsonl", '{"step": "one", "loss": 1}\n'),
        ["report", RUN],
        ["{root}/run/metrics.jsonl:1", "'step'"],
    ),
    "report-summary-bad-field": (
        _edit_json("run/eval/base/q/summary.json", lambda s: s.update(n="one")),
        ["report", RUN],
        ["{root}/run/eval/base/q/summary.json", "'n'"],
    ),
    "report-manifest-bad-count": (
        _write("run/manifest.json", json.dumps({"stages": {"rollout": {"counts": {"questions": "3"}}}})),
        ["report", RUN],
        ["{root}/run/manifest.json", "'stages.rollout.counts.questions'"],
    ),
    # ------------------------------------------------------------------ answers (`ssb verify`)
    "verify-not-utf8": (
        _write("v.jsonl", b'{"pred": "1", "gold": "1"}\n{"pred": "\xff", "gold": "1"}\n'),
        ["verify", "--input", "{root}/v.jsonl"],
        ["{root}/v.jsonl:2", "UTF-8"],
    ),
    "verify-nested": (
        _write("v.jsonl", '{"pred": "1", "gold": "1"}\n{"pred": ' + NESTED + "}\n"),
        ["verify", "--input", "{root}/v.jsonl"],
        ["{root}/v.jsonl:2", "nested"],
    ),
    "experiment-yaml-unclosed": (
        _write("e.yaml", "name: x\narms: {b: {kind: base}\n"),
        ["experiment", "{root}/e.yaml", "--out", "{root}/exp"],
        ["{root}/e.yaml:3:", "not valid YAML"],
    ),
    "experiment-unknown-kind": (
        _write("e.yaml", "name: x\npreset: quick\narms: {b: {kind: magic}}\n"),
        ["experiment", "{root}/e.yaml", "--out", "{root}/exp"],
        ["{root}/e.yaml", "'arms.b.kind'"],
    ),
    "experiment-bad-override": (
        _write("e.yaml", "name: x\npreset: quick\narms: {s: {kind: ssb, set: [rollout.k=zero]}}\n"),
        ["experiment", "{root}/e.yaml", "--out", "{root}/exp"],
        ["{root}/e.yaml", "'rollout.k'"],
    ),
    "verify-bad-gold": (
        _write("v.jsonl", '{"pred": "1", "gold": "1"}\n{"pred": "1", "gold": "\\\\boxed{"}\n'),
        ["verify", "--input", "{root}/v.jsonl"],
        ["{root}/v.jsonl:2", "'gold'"],
    ),
    "verify-gold-a-list": (
        _write("v.jsonl", '{"pred": "1", "gold": [1]}\n'),
        ["verify", "--input", "{root}/v.jsonl"],
        ["{root}/v.jsonl:1", "'gold'"],
    ),
    "verify-pred-an-object": (
        _write("v.jsonl", '{"pred": {"a": 1}, "gold": "1"}\n'),
        ["verify", "--input", "{root}/v.jsonl"],
        ["{root}/v.jsonl:1", "'pred'"],
    ),
    "verify-output-a-directory": (
        _write("v.jsonl", '{"pred": "1", "gold": "1"}\n'),
        ["verify", "--input", "{root}/v.jsonl", "--output", "{root}/run"],
        ["{root}/run", "cannot write"],
    ),
    "verify-pair-bad-gold": (None, ["verify", "--", "5", "$$"], ["gold", "empty"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_a_clean_error_that_changes_nothing(name, template, tiny_model_dir, tmp_path, capsys):
    mutate, argv, needles = CASES[name]
    root = tmp_path / "w"
    shutil.copytree(template, root)
    if mutate is not None:
        mutate(root)
    before = _digest(root)
    fill = {"root": str(root), "model": str(tiny_model_dir)}
    capsys.readouterr()
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code not in (0, None), f"{name}: exit {code}\n{err}"
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle.format(**fill) in err, f"{name}: {needle.format(**fill)!r} not in:\n{err}"
    assert _digest(root) == before, f"{name}: the command changed files that were already there"


def test_every_verb_gets_malformed_input():
    from ssb.stages import VERBS

    verbs = {argv[0] for _, argv, _ in CASES.values()}
    assert verbs == set(VERBS), set(VERBS) - verbs
