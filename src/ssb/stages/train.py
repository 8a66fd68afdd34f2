"""Stage 5, `ssb train`: distil the teacher into a LoRA student that sees only the plain question prompt.

Student = base model + LoRA (train.lora_r, lora_alpha, target_modules); input = student chat prompt + the teacher's
solution ids; loss = kd_weight * T^2 KL(teacher || student) + ce_weight * CE on the solution tokens. The teacher is
the stored sparse logits (logits.mode=offline), or the same model with the adapter disabled, run in the same step
(online). kd_weight=0, ce_weight=1 is the SFT baseline on identical data and needs no teacher logits.

Runs single-process or under `accelerate launch` (DDP, DeepSpeed, FSDP): only the main process touches the
manifest, metrics and the saved adapter. Outputs: RUN/train/ (checkpoints; TensorBoard logs in train/tb with
train.report_to=[tensorboard]), RUN/metrics.jsonl, RUN/adapter/ (PeftModel.from_pretrained + ssb_base.json naming
the base), RUN/merged/ with train.merge. The LoRA, Trainer arguments and adapter saving are shared with GRPO
(`ssb.training`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from ssb.config import Config
from ssb.lifecycle import stage
from ssb.rundir import RunDir
from ssb.stages.logits import needs_stored_logits
from ssb.training import (
    last_checkpoint,
    lora_config,
    mean_train_loss,
    place_tensorboard_logs,
    save_adapter,
    train_device,
    trainer_arguments,
    trim_metrics,
)


def train(cfg: Config, run: RunDir, force: bool = False) -> dict:
    tc = cfg.train
    stored = needs_stored_logits(cfg)
    inputs = [run.pairs] + ([run.logits_dir] if stored else [])
    outputs = [run.train_dir, run.adapter_dir, run.metrics] + ([run.merged_dir] if tc.merge else [])

    def check() -> None:  # bad pairs fail here, before anything in the run directory changes
        from ssb.distill.pairs import read_pairs

        if not read_pairs(run.pairs):
            raise ValueError(f"{run.pairs}: no training pairs; the teach stage kept none")

    train_cfg = dataclasses.asdict(tc)
    if tc.max_pairs is None:  # off: the hash of runs from before the option stays the same
        del train_cfg["max_pairs"]
    parts = (cfg.model, train_cfg, cfg.logits, cfg.seed)
    with stage(run, "train", parts, inputs, outputs, force, check, every_rank=True) as st:  # DDP: every rank
        if st is None:
            return (run.stage_entry("train") or {}).get("counts", {})
        trainer, info = build_trainer(cfg, run, say=st.say)
        st.counts.update(info)
        resume = last_checkpoint(run.train_dir, st.resumed)
        if resume:
            st.say(f"[train] resuming from {resume}")
            if trainer.is_world_process_zero():
                trim_metrics(run.metrics, int(resume.rsplit("-", 1)[-1]))
        if resume is None and trainer.is_world_process_zero() and run.metrics.exists():
            run.metrics.unlink()
        result = trainer.train(resume_from_checkpoint=resume)
        _save(cfg, run, trainer)
        # over every step: after a resume, the Trainer's own training_loss covers only this session's steps
        loss = mean_train_loss(run.metrics) if trainer.is_world_process_zero() else None
        loss = result.training_loss if loss is None else loss
        st.counts.update(
            steps=trainer.state.global_step,
            train_loss=round(loss, 6),
            seconds_training=round(result.metrics.get("train_runtime", 0.0), 2),
        )
        if trainer.is_world_process_zero():
            st.say(
                f"[train] done: {trainer.state.global_step} steps, mean loss {loss:.4f}; adapter -> {run.adapter_dir}"
            )
        return dict(st.counts)


def build_trainer(cfg: Config, run: RunDir, say=print):
    """The model, data and `DistillTrainer` for this config (also used by tests and benchmarks)."""
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed

    from ssb.distill.loss import DistillLoss, OutputHead, check_head
    from ssb.distill.pairs import DistillCollator, PairDataset, encode_pairs, read_pairs
    from ssb.distill.store import TeacherStore
    from ssb.distill.trainer import DistillTrainer
    from ssb.models import load_model, load_tokenizer, model_fingerprint

    tc = cfg.train
    mode = "none" if tc.kd_weight == 0 else ("stored" if cfg.logits.mode == "offline" else "online")
    device = train_device(cfg)
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    head = OutputHead.of(model)
    records = read_pairs(run.pairs, vocab_size=head.vocab_size)
    if tc.max_pairs is not None:
        if len(records) < tc.max_pairs:
            say(f"[train] train.max_pairs={tc.max_pairs} but {run.pairs} holds {len(records)} pairs: training on all")
        records = records[: tc.max_pairs]
    pairs = encode_pairs(records, tok, teacher=mode == "online")
    kept = [p for p in pairs if p.student_len <= tc.max_length]
    if not kept:
        raise ValueError(f"{run.pairs}: all {len(pairs)} pairs are longer than train.max_length={tc.max_length}")
    if len(kept) < len(pairs):
        say(
            f"[train] dropped {len(pairs) - len(kept)} of {len(pairs)} pairs longer than "
            f"train.max_length={tc.max_length} tokens"
        )
    check_head(model, head, torch.tensor([kept[0].student_prompt], device=model.device))
    store = None
    if mode == "stored":
        store = TeacherStore(run.logits_dir)
        store.check(temperature=tc.temperature, vocab_size=head.vocab_size, fingerprint=model_fingerprint(model, tok))
        for p in kept:
            if p.id not in store:
                raise ValueError(f"{run.logits_dir}: no teacher logits for pair {p.id!r}; rerun `ssb logits`")
            if store.length(p.id) != p.solution_len:
                raise ValueError(
                    f"{run.logits_dir}: teacher logits for {p.id!r} cover {store.length(p.id)} tokens, "
                    f"the solution has {p.solution_len}; rerun `ssb logits --force`"
                )
    sparse = mode == "stored" and store.kind != "hidden"
    kd_is = "full" if not sparse else ("topk_bucketed" if store.kind == "topk" else "sampled_estimate")
    set_seed(cfg.seed)  # LoRA initialisation
    model = get_peft_model(model, lora_config(cfg))
    common = trainer_arguments(
        cfg,
        device,
        run.train_dir,
        learning_rate=tc.learning_rate,
        logging_steps=tc.logging_steps,
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
    )
    precision = "bf16" if common["bf16"] else ("fp16" if common["fp16"] else "none")
    args = TrainingArguments(
        **common,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum,
        num_train_epochs=tc.epochs,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=PairDataset(kept),
        data_collator=DistillCollator(tok.pad_token_id, store=store, online=mode == "online"),
        processing_class=tok,
        teacher=mode,
        metrics_path=run.metrics,
        distill_loss=DistillLoss(tc.temperature, kd_weight=tc.kd_weight, ce_weight=tc.ce_weight),
        kd_is=kd_is,
        reference=_reference(cfg, run, records, kept, mode, store),
    )
    place_tensorboard_logs(trainer, run.train_dir / "tb")
    n_tok = sum(p.solution_len for p in kept)
    say(
        f"[train] {len(kept)} pairs ({n_tok} solution tokens), teacher: {mode}, T={tc.temperature}, "
        f"kd {tc.kd_weight} ce {tc.ce_weight}, LoRA r={tc.lora_r} alpha={tc.lora_alpha}, "
        f"{trainer.accelerator.num_processes} process(es) on {device}, mixed precision: {precision}"
    )
    info = {
        "pairs": len(kept),
        "dropped_too_long": len(pairs) - len(kept),
        "solution_tokens": n_tok,
        "teacher": mode,
        "kd_is": kd_is if mode != "none" else None,
        "processes": trainer.accelerator.num_processes,
        "mixed_precision": precision,
    }
    return trainer, info


def _reference(cfg: Config, run: RunDir, records: list[dict], kept: list, mode: str, store):
    """(pairs, exact teacher store or None = online, stored-scheme store or None) for the per-epoch full-KL record
    on the first logits.reference_pairs pairs by id; None when there is nothing exact to compare with."""
    from ssb.distill.store import TeacherStore
    from ssb.stages.logits import reference_ids

    ids = set(reference_ids(records, cfg.logits.reference_pairs))
    pairs = [p for p in kept if p.id in ids]
    if not pairs or mode == "none":
        return None
    if mode == "online":
        return pairs, None, None
    if store.kind == "hidden":
        return pairs, store, None
    root = run.logits_dir / "reference"
    if not (root / "index.json").exists():
        return None
    exact = TeacherStore(root)
    pairs = [p for p in pairs if p.id in exact]
    return (pairs, exact, store) if pairs else None


def _save(cfg: Config, run: RunDir, trainer) -> None:
    """The adapter and, with train.merge, the merged model (base + LoRA); written by the main process."""
    save_adapter(cfg, trainer, run.adapter_dir)
    if cfg.train.merge and trainer.is_world_process_zero():
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        tmp = run.merged_dir.with_name(run.merged_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        (tmp / "ssb_source.json").write_text(json.dumps({"base": cfg.model, "adapter": str(run.adapter_dir)}))
        shutil.rmtree(run.merged_dir, ignore_errors=True)
        os.replace(tmp, run.merged_dir)
    trainer.accelerator.wait_for_everyone()
