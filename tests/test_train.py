"""The distillation trainer on a tiny model: offline, online and SFT runs, normalisation under gradient
accumulation, resume after a kill, refusal of mismatched logits, and two-process DDP."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssb.config import ConfigError, config_hash, load_config, save_config
from ssb.files import read_jsonl
from ssb.rundir import RunDir
from ssb.testing import write_arith_pairs

SYSTEM = "You are a helpful math tutor."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The random tiny model made context-dependent and peaked, so hinted and plain prompts disagree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        m.model.norm.weight.mul_(30)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    m.save_pretrained(path)
    return path, AutoTokenizer.from_pretrained(path)


BASE = {
    "logits.store": "topk",
    "logits.top_k": 16,
    "train.batch_size": 2,
    "train.epochs": 2,
    "train.learning_rate": 0.01,
    "train.lora_r": 4,
    "train.lora_alpha": 8,
    "train.save_steps": 100,
    "train.gradient_checkpointing": False,
    "train.mixed_precision": "none",
}  # exact comparisons below; bf16 autocast has its own test


def _setup(root, tiny, n=6, **sets):
    path, tok = tiny
    run = RunDir(root).mkdir()
    write_arith_pairs(run.pairs, tok, n)
    cfg = load_config(None, [f"{k}={v}" for k, v in {"model": str(path), **BASE, **sets}.items()])
    return run, cfg


def _metrics(run):
    """The per-step records (the per-epoch reference records, with full_kd, are left out)."""
    return [r for r in _all_metrics(run) if "loss" in r]


def _all_metrics(run):
    return [json.loads(line) for line in run.metrics.read_text().splitlines()]


def _adapter(run):
    return load_file(str(run.adapter_dir / "adapter_model.safetensors"))


def _assert_same_adapter(a, b, atol=1e-6):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5)


def test_offline_distillation_end_to_end(tmp_path, tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ssb.stages.logits import logits
    from ssb.stages.train import train

    run, cfg = _setup(
        tmp_path / "run", tiny, **{"train.epochs": 4, "train.merge": True, "train.report_to": "[tensorboard]"}
    )
    logits(cfg, run)
    counts = train(cfg, run)
    assert counts["teacher"] == "stored" and counts["pairs"] == 6 and counts["steps"] == 12
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"step", "epoch", "loss", "kd", "kd_is", "ce", "grad_norm", "lr", "completion_len"}
    assert rows[0]["kd_is"] == counts["kd_is"] == "topk_bucketed"
    reference = [r for r in _all_metrics(run) if "full_kd" in r]
    assert [r["epoch"] for r in reference] == [1.0, 2.0, 3.0, 4.0] and reference[0]["reference_pairs"] == 4
    # top-k + one tail bucket can only lower the KL: the stored value sits below the exact one
    assert all(0 < r["stored_kd"] <= r["full_kd"] + 1e-6 for r in reference)
    assert all(r["loss"] == pytest.approx(r["kd"]) for r in rows)  # kd_weight 1, ce_weight 0
    first, last = sum(r["kd"] for r in rows[:3]), sum(r["kd"] for r in rows[-3:])
    assert first > 0.05 and last < 0.5 * first  # the student moves towards the hinted teacher
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[-1]["epoch"] == pytest.approx(4.0)
    assert 10 < rows[0]["completion_len"] < 40
    assert list((run.train_dir / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run.adapter_dir / "ssb_base.json").read_text()) == {
        "model": str(tiny[0]),
        "trust_remote_code": False,
    }
    base = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = base(ids).logits
        student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), run.adapter_dir).eval()
        after = student(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run.merged_dir).eval()(ids).logits
    assert (after - before).abs().max() > 1e-3  # the adapter changed the model
    torch.testing.assert_close(merged, after, atol=1e-4, rtol=1e-4)
    assert train(cfg, run) == counts  # done with the same config and inputs: skipped


def test_sft_baseline_needs_no_teacher_logits(tmp_path, tiny):
    from ssb.stages.train import train

    run, cfg = _setup(tmp_path / "run", tiny, **{"train.kd_weight": 0, "train.ce_weight": 1, "train.epochs": 3})
    counts = train(cfg, run)
    assert counts["teacher"] == "none" and not run.logits_dir.exists()
    rows = _metrics(run)
    assert all(r["kd"] is None and r["loss"] == pytest.approx(r["ce"]) for r in rows)
    assert rows[-1]["ce"] < 0.7 * rows[0]["ce"]


def test_max_pairs_trains_on_the_first_pairs_and_keeps_old_hashes(tmp_path, tiny):
    """train.max_pairs takes the first N pairs in file order; unset, it leaves the stage's config hash as it was
    before the option existed (a resumed run does not retrain)."""
    from ssb.stages.train import build_trainer, train

    sets = {"train.kd_weight": 0, "train.ce_weight": 1, "train.epochs": 1, "train.max_pairs": 4}
    run, cfg = _setup(tmp_path / "run", tiny, **sets)
    trainer, info = build_trainer(cfg, run)
    ids = [p["id"] for p in read_jsonl(run.pairs)]
    assert info["pairs"] == 4 and sorted(trainer.train_dataset[i].id for i in range(4)) == sorted(ids[:4])
    assert train(cfg, run)["pairs"] == 4
    plain, cfg_plain = _setup(tmp_path / "plain", tiny, **{k: v for k, v in sets.items() if k != "train.max_pairs"})
    train(cfg_plain, plain)
    entry = plain.stage_entry("train")
    legacy = {k: v for k, v in dataclasses.asdict(cfg_plain.train).items() if k != "max_pairs"}
    assert entry["config_hash"] == config_hash(cfg_plain.model, legacy, cfg_plain.logits, cfg_plain.seed)
    assert entry["config_hash"] != run.stage_entry("train")["config_hash"]


def _first_batch_loss(cfg, run):
    from ssb.stages.train import build_trainer

    trainer, _ = build_trainer(cfg, run)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_online_teacher_equals_stored_logits_with_full_vocabulary(tmp_path, tiny):
    from ssb.stages.logits import logits

    run, cfg = _setup(tmp_path / "run", tiny, **{"logits.top_k": 100000})  # k clipped to the vocabulary
    logits(cfg, run)
    offline = _first_batch_loss(cfg, run)
    _, online_cfg = _setup(tmp_path / "run", tiny, **{"logits.mode": "online"})
    online = _first_batch_loss(online_cfg, run)
    hidden_run, hidden_cfg = _setup(tmp_path / "hidden", tiny, **{"logits.store": "hidden"})
    logits(hidden_cfg, hidden_run)
    hidden = _first_batch_loss(hidden_cfg, hidden_run)
    assert offline > 0.05
    assert online == pytest.approx(offline, rel=2e-3)  # float16 storage of the log-probabilities
    assert hidden == pytest.approx(online, rel=2e-3)  # float16 storage of the hidden states


def test_bf16_autocast_training_on_cpu(tmp_path, tiny):
    """train.mixed_precision=bf16 (auto's choice on CPUs with AMX): the body and the loss's head run under bf16
    autocast, the LoRA weights stay fp32, the first loss is within bf16 rounding of fp32's, and training learns."""
    from ssb.models import resolve_mixed_precision
    from ssb.stages.logits import logits
    from ssb.stages.train import build_trainer, train

    assert resolve_mixed_precision("none", "cpu") == "none"
    with pytest.raises(ValueError, match="train.mixed_precision.: fp16 needs a CUDA device"):
        resolve_mixed_precision("fp16", "cpu")
    run, cfg = _setup(tmp_path / "run", tiny, **{"train.epochs": 4})
    logits(cfg, run)
    exact = _first_batch_loss(cfg, run)
    _, bf16_cfg = _setup(tmp_path / "run", tiny, **{"train.epochs": 4, "train.mixed_precision": "bf16"})
    trainer, info = build_trainer(bf16_cfg, run)
    assert info["mixed_precision"] == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(exact, rel=5e-2)
    counts = train(bf16_cfg, run)
    rows = _metrics(run)
    assert counts["mixed_precision"] == "bf16" and len(rows) == 12
    assert sum(r["kd"] for r in rows[-3:]) < 0.5 * sum(r["kd"] for r in rows[:3])
    assert all(t.dtype == torch.float32 for t in _adapter(run).values())


def test_gradient_accumulation_is_a_token_level_mean_over_the_effective_batch(tmp_path, tiny):
    from ssb.stages.logits import logits
    from ssb.stages.train import train

    sets = {"train.epochs": 1, "train.max_grad_norm": 0.0}
    big, cfg_big = _setup(tmp_path / "big", tiny, n=4, **sets)
    logits(cfg_big, big)
    small, cfg_small = _setup(tmp_path / "small", tiny, n=4, **sets, **{"train.batch_size": 1, "train.grad_accum": 2})
    shutil.copytree(big.logits_dir, small.logits_dir)
    shutil.copy(big.manifest_path, small.manifest_path)
    train(cfg_big, big)
    train(cfg_small, small)
    _assert_same_adapter(_adapter(big), _adapter(small))
    for a, b in zip(_metrics(big), _metrics(small)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_killed_training_resumes_from_its_last_checkpoint(tmp_path, tiny, monkeypatch):
    from ssb.distill.trainer import DistillTrainer
    from ssb.stages.train import train

    sets = {"train.save_steps": 2, "train.kd_weight": 0, "train.ce_weight": 1}
    ref, cfg = _setup(tmp_path / "ref", tiny, **sets)
    train(cfg, ref)
    run, cfg = _setup(tmp_path / "run", tiny, **sets)
    real = DistillTrainer.training_step

    def dying_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "training_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run)
    assert run.stage_entry("train")["status"] == "failed" and (run.train_dir / "checkpoint-2").exists()
    monkeypatch.setattr(DistillTrainer, "training_step", real)
    train(cfg, run)
    assert [r["step"] for r in _metrics(run)] == [r["step"] for r in _metrics(ref)] == list(range(1, 7))
    _assert_same_adapter(_adapter(run), _adapter(ref), atol=1e-5)
    # the manifest's mean loss covers all 6 steps, not only the 4 of the resumed session
    losses = [r["loss"] for r in _metrics(ref)]
    assert ref.stage_entry("train")["counts"]["train_loss"] == pytest.approx(sum(losses) / 6, abs=1e-5)
    assert run.stage_entry("train")["counts"]["train_loss"] == pytest.approx(sum(losses) / 6, abs=1e-4)


def test_logits_from_another_temperature_or_model_are_refused(tmp_path, tiny):
    from ssb.distill.store import TeacherStoreError
    from ssb.stages.logits import logits
    from ssb.stages.train import train

    run, cfg = _setup(tmp_path / "run", tiny)
    logits(cfg, run)
    _, hot = _setup(tmp_path / "run", tiny, **{"train.temperature": 1.0})
    with pytest.raises(TeacherStoreError, match="temperature 2.0, training uses train.temperature=1.0"):
        train(hot, run)
    from ssb.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=1)
    _, cfg_other = _setup(tmp_path / "run", tiny, model=str(other))
    with pytest.raises(TeacherStoreError, match="another model or tokenizer"):
        train(cfg_other, run)


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: ~30 s on a shared 2-core machine
def test_two_process_ddp_matches_one_process_with_the_same_effective_batch(tmp_path, tiny):
    """`accelerate launch --multi_gpu --num_processes 2 -m ssb train` (on a machine without GPUs: two CPU processes,
    gloo): each rank trains on its own shard of each batch, and the adapter equals a single-process run with
    batch_size 2. (`--cpu` would start a single process: accelerate's simple launcher.)"""
    from ssb.stages.logits import logits
    from ssb.stages.train import train

    sets = {"train.epochs": 1, "train.batch_size": 2}
    one, cfg = _setup(tmp_path / "one", tiny, **sets)
    logits(cfg, one)
    two, cfg_two = _setup(tmp_path / "two", tiny, **{**sets, "train.batch_size": 1})
    shutil.copytree(one.logits_dir, two.logits_dir)
    shutil.copy(one.manifest_path, two.manifest_path)
    train(cfg, one)
    save_config(cfg_two, tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        "-m",
        "ssb",
        "train",
        "--config",
        str(tmp_path / "two.yaml"),
        "--run-dir",
        str(two.root),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    counts = two.stage_entry("train")["counts"]
    assert counts["processes"] == 2 and counts["steps"] == 3
    _assert_same_adapter(_adapter(one), _adapter(two), atol=1e-5)
    assert [r["step"] for r in _metrics(two)] == [1, 2, 3]  # written once, by rank 0
    for a, b in zip(_metrics(one), _metrics(two)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["completion_len"] == pytest.approx(b["completion_len"])


def test_sampled_store_end_to_end_logs_what_kd_is_and_the_full_kl(tmp_path, tiny):
    """logits.store=sampled through the logits and train stages: the draws are reproducible from (seed, example
    id), the logged kd says it is a sampled estimate, and each epoch logs the exact full-vocabulary KL on the
    reference pairs beside the sampled estimate; training lowers the exact KL. Hybrid loads and trains too."""
    from ssb.distill.loss import SampledTeacher
    from ssb.distill.store import TeacherStore
    from ssb.stages.logits import logits
    from ssb.stages.train import train

    sets = {"logits.store": "sampled", "logits.samples": 64, "train.epochs": 3, "logits.reference_pairs": 3}
    run, cfg = _setup(tmp_path / "run", tiny, **sets)
    counts = logits(cfg, run)
    assert counts["store"] == "sampled" and counts["samples"] == 64 and counts["reference_pairs"] == 3
    assert counts["bytes_per_token"] > 4 * 64  # 16-bit ids + float16 log-probs, plus shard headers
    store = TeacherStore(run.logits_dir)
    rows = store["arith-0"]
    assert isinstance(rows, SampledTeacher) and rows.ids.shape[1] == 64
    again, _ = _setup(tmp_path / "again", tiny, **sets)
    logits(cfg, again)
    other, other_cfg = _setup(tmp_path / "other", tiny, **sets, seed=1)
    logits(other_cfg, other)
    assert torch.equal(TeacherStore(again.logits_dir)["arith-0"].ids, rows.ids)  # same seed, same draws
    assert not torch.equal(TeacherStore(other.logits_dir)["arith-0"].ids, rows.ids)
    assert len(TeacherStore(run.logits_dir / "reference")) == 3

    counts = train(cfg, run)
    assert counts["kd_is"] == "sampled_estimate" and counts["steps"] == 9
    steps = _metrics(run)
    assert all(r["kd_is"] == "sampled_estimate" for r in steps)
    reference = [r for r in _all_metrics(run) if "full_kd" in r]
    assert [r["epoch"] for r in reference] == [1.0, 2.0, 3.0]
    assert all(r["reference_pairs"] == 3 and r["full_kd"] > 0 and r["stored_kd"] is not None for r in reference)
    assert reference[-1]["full_kd"] < reference[0]["full_kd"]  # the student moves towards the full teacher

    hybrid, hybrid_cfg = _setup(tmp_path / "hybrid", tiny, **{**sets, "logits.store": "hybrid", "train.epochs": 1})
    assert logits(hybrid_cfg, hybrid)["top_k"] == 16  # BASE's logits.top_k: the exact head
    assert TeacherStore(hybrid.logits_dir)["arith-0"].ids.shape[1] == 16 + 64
    assert train(hybrid_cfg, hybrid)["kd_is"] == "sampled_estimate"


def test_warmup_ratio_is_a_share_of_the_steps_and_report_to_passes_through(tmp_path, tiny):
    """train.warmup_ratio reaches the Trainer as a share of the optimizer steps (transformers 5 reads a float
    warmup_steps below 1 that way), and train.report_to as the Trainer's own report_to."""
    from ssb.stages.train import build_trainer

    run, cfg = _setup(
        tmp_path / "run", tiny, **{"train.kd_weight": 0, "train.ce_weight": 1, "train.warmup_ratio": 0.25}
    )
    trainer, _ = build_trainer(cfg, run)
    assert trainer.args.get_warmup_steps(12) == 3 and trainer.args.get_warmup_steps(40) == 10
    assert trainer.args.report_to in ([], "none", ["none"])
    with pytest.raises(ConfigError, match="train.warmup_ratio"):
        load_config(None, ["train.warmup_ratio=1.0"])
    run2, cfg2 = _setup(
        tmp_path / "run2", tiny, **{"train.kd_weight": 0, "train.ce_weight": 1, "train.report_to": "[tensorboard]"}
    )
    trainer2, _ = build_trainer(cfg2, run2)
    assert trainer2.args.report_to == ["tensorboard"]
