"""Issue 15, one test per finding: remote code only by the user's own choice, bounded verification, content-based
bare answers, directory-safe eval outputs, no verified pair lost on a kill, bad records named (or skipped), unique
stale names, clean errors instead of tracebacks, rejected config values, and the state a failed or resumed command
leaves behind. docs/security.md says what each test guards."""

from __future__ import annotations

import json
import random
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ssb.cli import main
from ssb.config import ConfigError, load_config, save_config
from ssb.files import read_jsonl, write_jsonl
from ssb.lifecycle import stage
from ssb.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _questions(path: Path, n: int = 3, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
    for i, fields in extra.items():
        rows[int(i[1:])].update(fields)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tiny_sets(model, data, **extra) -> list[str]:
    values = {
        "model": str(model),
        "data.train.source": str(data),
        "rollout.k": 2,
        "rollout.max_new_tokens": 4,
        "rollout.batch_size": 4,
        "teach.max_new_tokens": 8,
        "teach.batch_size": 4,
        **extra,
    }
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={v}"]
    return out


# ------------------------------------------------------------------------------- 1. remote code


def _remote_code_model(root: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config maps to code in evil.py, which leaves a marker file when imported."""
    import shutil

    base = root / "evil-base"
    shutil.copytree(tiny_model_dir, base)
    marker = root / "REMOTE_CODE_RAN"
    (base / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(cfg))
    return base, marker


def _adapter_for(base: Path, target: Path, trust: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)  # built-in Llama code: trust_remote_code is off
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(target)
    (target / "ssb_base.json").write_text(json.dumps({"model": str(base), "trust_remote_code": trust}))
    return target


def test_an_adapter_cannot_turn_remote_code_on(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import transformers.dynamic_module_utils as dmu

    import ssb.models
    from ssb.models import load_model, load_tokenizer

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # keep any copied code here
    monkeypatch.setattr(ssb.models, "_REMOTE_CODE_WARNED", set())  # the warning is said once per repository
    base, marker = _remote_code_model(tmp_path, tiny_model_dir)
    assert not marker.exists()
    adapter = _adapter_for(base, tmp_path / "adapter", trust=True)  # someone hands the user this adapter
    load_model(str(adapter), device="cpu")
    load_tokenizer(str(adapter))
    assert not marker.exists(), "the adapter's ssb_base.json switched remote code on"
    err = capsys.readouterr().err
    assert "cannot turn remote code on" in err and str(base) in err
    # The user's own setting still works, and says whose code may run.
    load_tokenizer(str(tiny_model_dir), trust_remote_code=True)
    assert f"trust_remote_code is on: Python code shipped with {tiny_model_dir}" in capsys.readouterr().err


def test_a_saved_config_in_a_run_directory_cannot_turn_remote_code_on(tmp_path, capsys):
    """A run directory can come from anyone too: its config.yaml is reused by later verbs, but not its trust."""
    from ssb.cli import build_parser, resolve_config

    run = RunDir(tmp_path / "run")
    save_config(load_config(None, ["trust_remote_code=true"]), run.config)
    cfg, _, _ = resolve_config(build_parser().parse_args(["curate", "--run-dir", str(run.root)]))
    assert cfg.trust_remote_code is False
    assert "a saved config cannot turn remote code on" in capsys.readouterr().err
    argv = ["curate", "--run-dir", str(run.root), "--set", "trust_remote_code=true"]  # the user's own flag
    assert resolve_config(build_parser().parse_args(argv))[0].trust_remote_code is True


def test_the_adapters_record_of_trust_remote_code_is_information_only(tmp_path, tiny_model_dir):
    from ssb.models import adapter_info

    adapter = _adapter_for(tiny_model_dir, tmp_path / "adapter", trust=True)
    info = adapter_info(adapter)
    assert info["recorded_trust_remote_code"] is True and "trust_remote_code" not in info


# ------------------------------------------------------------------------------- 2. verification bounds


def _finishes(fn, seconds: float):
    """Runs fn in a thread; (finished, result). A hang does not hang the test (the thread is a daemon)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive() and bool(out)), (out[0] if out else None)


def test_extracting_20000_nested_boxes_is_linear():
    from ssb.verify import extract_answer

    text = "\\boxed{" * 20_000
    done, found = _finishes(lambda: extract_answer(text), 20)  # milliseconds now; quadratic took minutes
    assert done, "extraction of 20,000 nested unclosed \\boxed{ did not finish"
    assert found.rule != "boxed"  # no box is closed
    done, found = _finishes(lambda: extract_answer(text + "5" + "}" * 20_000), 20)
    assert done and (found.answer, found.rule) == ("5", "boxed")  # the last (innermost) box


PATHOLOGICAL = [
    "\\boxed{" * 20_000,  # 140 KB of unclosed, nested boxes
    "answer is \\boxed{" * 60_000,  # 1 MB: every answer phrase followed by an unclosed box
    "".join(random.Random(0).choice(string.printable) for _ in range(1_000_000)),  # 1 MB of noise
]


def test_verify_cli_returns_within_its_timeout_on_megabyte_inputs(tmp_path):
    """Through `ssb verify --input` (a fresh process): each pathological line gets a verdict, "timeout" or a result.
    The bound covers the worker start-ups (sympy imports, repeated when a worker is replaced after a timeout) and
    a generous allowance per item; before extraction was linear and under the deadline, the first line alone took
    minutes."""
    timeout = 2.0
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"pred": p, "gold": "5"}) + "\n" for p in PATHOLOGICAL))
    cmd = [sys.executable, "-m", "ssb", "verify", "--input", str(inp), "--output", str(out), "--timeout", str(timeout)]
    cmd += ["--workers", "1"]
    bound = 60 + len(PATHOLOGICAL) * (timeout + 30)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=bound, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = [json.loads(line)["verdict"] for line in out.read_text().splitlines()]
    assert len(verdicts) == len(PATHOLOGICAL)
    assert set(verdicts) <= {"correct", "incorrect", "unparsed", "timeout"}


def test_long_texts_are_read_inside_the_workers_deadline():
    from ssb.verify import Verifier

    long_box = "Some working. " * 5000 + "So \\boxed{5}."  # 70,000 characters: more than INLINE_CHARS
    with Verifier(timeout=0.5, workers=1) as v:
        v.equivalent_many([("x^2", "x**2")])  # start the worker (its sympy import is not timed)
        pooled = v.stats["pooled"]
        t0 = time.monotonic()
        got = v.check_many([(long_box, "5"), (PATHOLOGICAL[2], "5")])
        elapsed = time.monotonic() - t0
        stats = v.stats
    assert (got[0].extracted, got[0].rule, got[0].verdict) == ("5", "boxed", "correct")  # read by the worker
    assert got[1].verdict in ("incorrect", "unparsed", "timeout")
    assert stats["pooled"] - pooled == 2  # both texts went to the worker: too long to read in this process
    assert elapsed < 60  # two deadlines of 0.5 s plus at most one worker restart


def test_a_long_bare_answer_is_taken_whole(capsys):
    """A sum of 120 ones (239 characters) is a bare answer like a sum of 99; its last number is not the answer."""
    from ssb.verify.cli import verify_main
    from ssb.verify.extract import extract_or_whole

    for n in (99, 120, 400):
        s = "+".join(["1"] * n)
        assert extract_or_whole(s).rule == "whole"
        assert verify_main([s, str(n)]) == 0, n
        assert capsys.readouterr().out.strip() == "correct"
    assert extract_or_whole("I think it is " + "+".join(["1"] * 120)).rule != "whole"  # prose stays prose


# ------------------------------------------------------------------------------- 4. eval output directory


@pytest.mark.parametrize("relative", [False, True])
def test_eval_output_dir_is_named_by_a_safe_tag(tmp_path, monkeypatch, relative):
    import ssb.stages.evaluate as ev

    data = _questions(tmp_path / "data" / "q.jsonl")
    monkeypatch.chdir(tmp_path)
    source = "data/q.jsonl" if relative else str(data)
    calls = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, model, bench, out, **kw: calls.append(out))
    run = tmp_path / "run"
    assert main(["eval", "--run-dir", str(run), "--set", f"eval.data.source={source}"]) == 0
    assert calls == [run / "eval" / "base" / "q"]
    assert data.read_text()  # the data file is still a file


def test_benchmark_tag_never_leaves_the_eval_directory():
    from ssb.stages.run import benchmark_tag  # defined in ssb.rundir, shared by `ssb run` and `ssb eval`

    assert benchmark_tag("gsm8k") == "gsm8k" and benchmark_tag("openai/gsm8k") == "gsm8k"
    assert benchmark_tag("/abs/path/q.jsonl") == "q" and benchmark_tag("rel/q.v2.jsonl") == "q.v2"
    for bad in ("..", ".", "/", "", "a/..", "../../etc/passwd"):
        tag = benchmark_tag(bad)
        assert tag and "/" not in tag and tag not in (".", ".."), (bad, tag)
    run = RunDir("/r")
    assert run.eval_dir("..", "..").parent.parent == Path("/r/eval")


# ------------------------------------------------------------------------------- 5. a kill during teach


def _curated_for_teacher(run: RunDir, model_dir: Path, n: int = 4) -> set[str]:
    """Curated questions whose golds are what the deterministic (T=0) teacher answers, where it stops on its own:
    those attempts verify."""
    from ssb.engine.engine import Engine, SamplingParams
    from ssb.models import load_model, load_tokenizer
    from ssb.prompts import load_template, student_messages, teacher_messages
    from ssb.verify import extract_answer

    tmpl = load_template(None)
    curated = [
        {
            "id": f"q{i}",
            "question": f"Question {i}?",
            "gold": "?",
            "teacher_messages": teacher_messages(tmpl, f"Question {i}?", f"it is {i}", "x 1", "SYS"),
            "student_messages": student_messages(f"Question {i}?", "SYS"),
        }
        for i in range(n)
    ]
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    outs = Engine(model, tok, batch_size=4, progress=False).generate(
        [c["teacher_messages"] for c in curated], n=1, params=SamplingParams(temperature=0, max_new_tokens=16)
    )
    kept = set()
    for c, (o,) in zip(curated, outs):
        got = extract_answer(o.text).answer
        c["gold"] = got if got is not None and o.finish_reason == "stop" else "123456789"
        if c["gold"] != "123456789":
            kept.add(c["id"])
    write_jsonl(run.curated, curated)
    return kept


class _Killed(BaseException):
    pass


def test_a_kill_between_pair_and_attempt_log_loses_no_pair(tmp_path, answering_model_dir, monkeypatch):
    """The kill lands right after the first record of the teach stage reaches disk (simulated by an exception from
    the writer, after its flush + fsync). Writing the attempt log first lost that pair for good: the rerun saw the
    attempt and skipped the question."""
    import ssb.files
    from ssb.stages.teach import teach

    run = RunDir(tmp_path / "run").mkdir()
    sets = [f"model={answering_model_dir}", "teach.max_new_tokens=16", "teach.temperature=0", "generation_dtype=model"]
    cfg = load_config(None, sets)
    expected = _curated_for_teacher(run, answering_model_dir)
    assert expected, "the teacher (trained to answer 'The answer is 4.') verified nothing"
    real = ssb.files.JsonlWriter.write

    def write_then_die(self, record):
        real(self, record)
        raise _Killed

    monkeypatch.setattr(ssb.files.JsonlWriter, "write", write_then_die)
    with pytest.raises(_Killed):
        teach(cfg, run)
    monkeypatch.setattr(ssb.files.JsonlWriter, "write", real)
    counts = teach(cfg, run)
    assert {p["id"] for p in read_jsonl(run.pairs)} == expected
    assert counts["pairs"] == len(expected)
    attempts = read_jsonl(run.teach_attempts)
    assert sorted(a["id"] for a in attempts) == sorted(f"q{i}" for i in range(4))  # every attempt logged once
    assert sum(a.get("restored", False) for a in attempts) == 1  # the one the kill cut off, rebuilt from its pair


# ------------------------------------------------------------------------------- 6. one bad record


def test_an_over_long_question_is_named_and_can_be_skipped(tmp_path, tiny_model_dir, capsys):
    data = _questions(tmp_path / "q.jsonl", q1={"question": "How many apples? " * 600})  # > 2048 tokens
    run = tmp_path / "run"
    assert main(["rollout", "--run-dir", str(run)] + _tiny_sets(tiny_model_dir, data)) == 2
    err = capsys.readouterr().err
    assert "question 'q1'" in err and "skip_bad_records" in err and "Traceback" not in err
    assert not run.exists()  # nothing written, no config.yaml either
    sets = _tiny_sets(tiny_model_dir, data, **{"data.train.skip_bad_records": "true"})
    assert main(["rollout", "--run-dir", str(run)] + sets) == 0
    assert "'q1'" in capsys.readouterr().out
    assert [r["id"] for r in read_jsonl(RunDir(run).rollouts)] == ["q0", "q2"]


def test_an_empty_id_is_rejected_when_the_data_is_read(tmp_path):
    from ssb.config import DatasetSpec
    from ssb.data import DataError, load_examples

    data = _questions(tmp_path / "q.jsonl", q1={"id": "  "})
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'id' is empty"):
        load_examples(DatasetSpec(source=str(data)))
    assert [e.id for e in load_examples(DatasetSpec(source=str(data), skip_bad_records=True))] == ["q0", "q2"]


# ------------------------------------------------------------------------------- 7. stale outputs


def test_two_moves_aside_in_one_second_keep_both_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # every move in the same second
    run = RunDir(tmp_path / "run")
    f, d = run.root / "out.jsonl", run.root / "logits"
    for text in ("first", "second", "third"):  # a stage rerun with --force three times
        with stage(run, "s", ({"k": 1},), inputs=[], outputs=[f, d], force=True) as st:
            assert st is not None
            f.write_text(text)
            d.mkdir()
            (d / "x").write_text(text)
    names = sorted(p.name for p in run.root.iterdir() if ".stale-" in p.name)
    assert names == [
        "logits.stale-20260101-000000",
        "logits.stale-20260101-000000-2",
        "out.jsonl.stale-20260101-000000",
        "out.jsonl.stale-20260101-000000-2",
    ]
    assert (run.root / "out.jsonl.stale-20260101-000000").read_text() == "first"
    assert (run.root / "logits.stale-20260101-000000-2" / "x").read_text() == "second"
    assert f.read_text() == "third"

    from ssb.rundir import move_aside

    assert move_aside(f).name == "out.jsonl.stale-20260101-000000-3"
    assert move_aside(d).name == "logits.stale-20260101-000000-3"


# ------------------------------------------------------------------------------- 8. clean errors


def _fails_cleanly(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_missing_model_and_model_without_weights_are_clean_errors(tmp_path, tiny_model_dir, capsys):
    import shutil

    data = _questions(tmp_path / "q.jsonl")
    run = str(tmp_path / "run")
    sets = _tiny_sets(tmp_path / "no-such-model", data)
    _fails_cleanly(["rollout", "--run-dir", run] + sets, capsys, "model path not found", "no-such-model")
    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, empty)
    for p in empty.glob("*.safetensors"):
        p.unlink()
    _fails_cleanly(["rollout", "--run-dir", run] + _tiny_sets(empty, data), capsys, "without weights", str(empty))
    assert not Path(run).exists()


def test_cuda_without_a_gpu_is_a_clean_error(tmp_path, tiny_model_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    sets = _tiny_sets(tiny_model_dir, _questions(tmp_path / "q.jsonl"), device="cuda")
    _fails_cleanly(["rollout", "--run-dir", str(tmp_path / "run")] + sets, capsys, "device", "CUDA is not available")


def test_non_utf8_data_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "q.jsonl"
    data.write_bytes(
        b'{"id": "a", "question": "1+1?", "answer": "2"}\n{"id": "b", "question": "caf\xe9", "answer": "1"}'
    )
    sets = _tiny_sets(tiny_model_dir, data)
    _fails_cleanly(["rollout", "--run-dir", str(tmp_path / "run")] + sets, capsys, f"{data}:2: not UTF-8")


# ------------------------------------------------------------------------------- 9. config values


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("teach.temperature=.inf", "teach.temperature"),
        ("train.learning_rate=-.inf", "train.learning_rate"),
        ("rollout.top_p=.nan", "rollout.top_p"),
        ("data.train.limit=-5", "data.train.limit"),
        ("eval.data.limit=0", "eval.data.limit"),
        ("train.save_total_limit=-1", "train.save_total_limit"),
        ("train.lora_alpha=-8", "train.lora_alpha"),
        ("seed=-1", "seed"),
        ("train.lora_dropout=1.5", "train.lora_dropout"),
        ("train.kd_weight=-1", "train.kd_weight"),
    ],
)
def test_values_that_mean_nothing_are_rejected(override, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        load_config(None, [override])


def test_yaml_1_1_exponent_strings_are_numbers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 1e-4\n  weight_decay: 5E-3\ngrpo:\n  learning_rate: 2e-6\n")
    cfg = load_config(f, ["teach.temperature=4e-1"])
    assert (cfg.train.learning_rate, cfg.train.weight_decay, cfg.grpo.learning_rate) == (1e-4, 5e-3, 2e-6)
    assert cfg.teach.temperature == 0.4
    for bad in ("nan", "1e", "e5", "1e-4x"):
        with pytest.raises(ConfigError, match="train.learning_rate"):
            load_config(None, [f"train.learning_rate={bad}"])


# ------------------------------------------------------------------------------- 10. state after failure


def test_a_failed_command_leaves_the_saved_config_as_it_was(tmp_path, capsys):
    run = RunDir(tmp_path / "run").mkdir()
    save_config(load_config(None, ["rollout.k=3"]), run.config)
    before = run.config.read_bytes()
    missing = tmp_path / "missing.jsonl"
    argv = ["rollout", "--run-dir", str(run.root), "--set", f"data.train.source={missing}", "--set", "rollout.k=5"]
    _fails_cleanly(argv, capsys, "data file not found", str(missing))
    assert run.config.read_bytes() == before
    assert sorted(p.name for p in run.root.iterdir()) == ["config.yaml"]


def test_a_torn_upstream_line_is_reported_and_redone(tmp_path, tiny_model_dir, capsys):
    data = _questions(tmp_path / "q.jsonl", n=4)
    run = RunDir(tmp_path / "run")
    assert main(["rollout", "--run-dir", str(run.root)] + _tiny_sets(tiny_model_dir, data)) == 0
    raw = run.rollouts.read_bytes()
    run.rollouts.write_bytes(raw[: len(raw) - 25])  # a kill in the middle of writing the last record
    run.update_stage("rollout", status="running")  # as the killed stage left the manifest
    capsys.readouterr()
    assert main(["curate", "--run-dir", str(run.root)]) == 0
    err = capsys.readouterr().err
    assert f"{run.rollouts}:4: dropped an incomplete last record" in err
    assert run.stage_entry("curate")["counts"]["questions"] == 3
    assert main(["rollout", "--run-dir", str(run.root)]) == 0  # the stage that wrote it redoes that record
    assert "resuming" in capsys.readouterr().out
    assert sorted(r["id"] for r in read_jsonl(run.rollouts)) == ["q0", "q1", "q2", "q3"]
    assert main(["curate", "--run-dir", str(run.root)]) == 0  # and its consumer reruns on the whole file
    assert run.stage_entry("curate")["counts"]["questions"] == 4


def test_the_rollout_stage_notices_its_data_file_changed(tmp_path, tiny_model_dir, capsys):
    data = _questions(tmp_path / "q.jsonl", n=2)
    run = RunDir(tmp_path / "run")
    argv = ["rollout", "--run-dir", str(run.root)] + _tiny_sets(tiny_model_dir, data)
    assert main(argv) == 0
    assert main(argv) == 0
    assert "skipping" in capsys.readouterr().out
    _questions(data, n=2, q1={"question": "What is 7 + 7?", "answer": "14"})
    assert main(argv) == 0
    assert "skipping" not in capsys.readouterr().out
    assert [r["question"] for r in read_jsonl(run.rollouts)][1] == "What is 7 + 7?"
