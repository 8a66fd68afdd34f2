"""`DistillTrainer`: a Hugging Face `Trainer` whose loss is the SSB distillation loss on solution tokens.

Everything else (optimizer, schedule, gradient accumulation and clipping, checkpoints and resume, seeded data order,
accelerate / DDP / DeepSpeed / FSDP) is the stock Trainer. Loss normalisation: the Trainer counts the solution
tokens of the whole accumulated batch across processes (`num_items_in_batch`, from the collator's shift_labels);
each micro-batch's loss is its token sum divided by that count, so accumulation and data parallelism give the
token-level mean over the effective batch.

The student's final hidden states at the solution positions go through the output head inside the loss, a chunk
at a time. Under FSDP or DeepSpeed ZeRO-3 (head weights sharded outside the forward pass) the model itself
projects only the solution positions (`logits_to_keep` = a boolean mask) and the loss starts from those logits.

Every metrics record names what its `kd` is (`kd_is`: full = the exact full-vocabulary T^2 KL, as the paper logs;
topk_bucketed = top-k + one tail bucket, a lower bound; sampled_estimate = an unbiased estimate from stored
draws). At each epoch's end, with a reference subset, one more record gives `full_kd` (exact T^2 KL, token mean)
and `stored_kd` (the stored scheme's value) on those few fixed pairs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, TrainerCallback

from ssb.distill.loss import DenseTeacher, DistillLoss, OutputHead, SampledTeacher, SparseTeacher, final_hidden
from ssb.training import log_boundaries_callback, metrics_line


class DistillTrainer(Trainer):
    def __init__(
        self,
        *args,
        distill_loss: DistillLoss,
        teacher: str,
        metrics_path: str | Path | None = None,
        kd_is: str = "full",
        reference: tuple | None = None,
        **kwargs,
    ):
        """teacher: 'stored' (sparse rows in the batch), 'online' (frozen base = adapter disabled) or 'none'.
        kd_is: what the logged kd is (full, topk_bucketed, sampled_estimate). reference: (pairs, exact store or
        None = run the frozen teacher, stored-scheme store or None) for the per-epoch full-KL record."""
        super().__init__(*args, **kwargs)
        if teacher not in ("stored", "online", "none"):
            raise ValueError(f"teacher must be 'stored', 'online' or 'none', got {teacher!r}")
        self.distill_loss, self.teacher_mode = distill_loss, teacher
        self.metrics_path = Path(metrics_path) if metrics_path else None
        # We normalise by num_items_in_batch ourselves: make the Trainer count it and not rescale for accumulation.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        from transformers.integrations import is_deepspeed_zero3_enabled

        self.via_logits = self.is_fsdp_enabled or is_deepspeed_zero3_enabled()
        self.head = None if self.via_logits else OutputHead.of(self._unwrapped(self.model))
        self._acc: torch.Tensor | None = None  # kd, ce, solution tokens, examples since the last log
        self._log_step = 0
        self.remove_callback(PrinterCallback)
        self.kd_is = kd_is if teacher != "none" else None
        self.reference = reference if teacher != "none" and not self.via_logits else None
        if self.reference:
            self.add_callback(_ReferenceKL(self))
        self.add_callback(log_boundaries_callback())

    def _unwrapped(self, model):
        return self.accelerator.unwrap_model(model)

    def _rows(self, model, ids, mask, shift):
        """Student (or teacher) inputs to the loss: hidden states [N, H], or logits [N, V] via the model's head."""
        keep = shift.ne(-100)
        if self.via_logits:
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False).logits
        return final_hidden(model, ids, mask)[keep]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        shift = inputs["shift_labels"]
        keep = shift.ne(-100)
        teacher = None
        if self.teacher_mode == "online":
            with torch.no_grad(), self._unwrapped(model).disable_adapter():
                t_rows = self._rows(model, inputs["t_input_ids"], inputs["t_attention_mask"], inputs["t_shift_labels"])
            teacher = DenseTeacher(t_rows.detach())
        elif self.teacher_mode == "stored" and "t_hidden" in inputs:
            if self.via_logits:
                raise ValueError("logits.store=hidden is not supported under FSDP / ZeRO-3; use logits.store=topk")
            teacher = DenseTeacher(inputs["t_hidden"])
        elif self.teacher_mode == "stored" and "t_weights" in inputs:
            teacher = SampledTeacher(inputs["t_ids"], inputs["t_weights"], inputs["t_logprobs"])
        elif self.teacher_mode == "stored":
            teacher = SparseTeacher(inputs["t_ids"], inputs["t_logprobs"], inputs["t_log_tail"])
        rows = self._rows(model, inputs["input_ids"], inputs["attention_mask"], shift)
        normalizer = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        with self.accelerator.autocast():  # the head's matmuls in the body's precision, as in the model's forward
            out = self.distill_loss(rows, shift[keep], teacher, normalizer, head=self.head)
        loss = out.loss
        if (
            self.args.average_tokens_across_devices
            and self.accelerator.num_processes > 1
            and num_items_in_batch is not None
        ):
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes; undo that
        if model.training:
            norm = torch.as_tensor(normalizer, dtype=torch.float32, device=loss.device)
            kd = out.kd_sum if out.kd_sum is not None else torch.zeros((), device=loss.device)
            step = torch.stack(
                [
                    kd.float() / norm,
                    out.ce_sum.float() / norm,
                    keep.sum().float(),
                    torch.tensor(float(keep.shape[0]), device=loss.device),
                ]
            )
            self._acc = step if self._acc is None else self._acc + step
        return (loss, {"rows": rows}) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self._acc is not None:
            acc = self._acc.detach()
            if self.accelerator.num_processes > 1:
                acc = self.accelerator.reduce(acc, reduction="sum")
            since = max(self._log_step, getattr(self, "_initial_global_step", 0))  # a resumed run starts there
            steps = max(1, self.state.global_step - since)
            kd, ce, tokens, examples = acc.tolist()
            if self.teacher_mode != "none":
                logs["kd"] = kd / steps
            logs["ce"] = ce / steps
            logs["completion_len"] = tokens / max(1.0, examples)
            self._acc, self._log_step = None, self.state.global_step
            if self.is_world_process_zero():
                self._write_metrics(logs)
        super().log(logs, start_time)

    def _write_metrics(self, logs: dict) -> None:
        rec = {
            "step": self.state.global_step,
            "epoch": round(self.state.epoch or 0.0, 4),
            "loss": logs["loss"],
            "kd": logs.get("kd"),
            "kd_is": self.kd_is,
            "ce": logs.get("ce"),
            "grad_norm": logs.get("grad_norm"),
            "lr": logs.get("learning_rate"),
            "completion_len": logs.get("completion_len"),
        }
        metrics_line(self.metrics_path, "train", rec, self.state.max_steps)

    @torch.no_grad()
    def reference_kd(self) -> dict:
        """Token-mean T^2 KL of the current student on the reference pairs: exact over the full vocabulary
        (`full_kd`) and, with a sparse store, as the stored scheme gives it (`stored_kd`)."""
        pairs, exact, stored = self.reference
        model = self._unwrapped(self.model)
        device = next(model.parameters()).device
        loss = DistillLoss(self.distill_loss.temperature)
        was_training, sums, tokens = model.training, {"full_kd": 0.0, "stored_kd": 0.0}, 0

        def rows(prompt, p):  # [L, H] final hidden states predicting the solution
            ids = torch.tensor([prompt + p.solution_ids], device=device)
            return final_hidden(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 : len(prompt) - 1 + p.solution_len]

        model.eval()
        try:
            for p in pairs:
                h = rows(p.student_prompt, p)
                if exact is None:
                    with model.disable_adapter():
                        full = DenseTeacher(rows(p.teacher_prompt, p))
                else:
                    full = exact[p.id]
                targets = torch.tensor(p.solution_ids, device=device)
                teachers = {"full_kd": full, "stored_kd": stored[p.id] if stored is not None else None}
                with self.accelerator.autocast():
                    for key, t in teachers.items():
                        if t is not None:
                            t = type(t)(*(x.to(device) for x in t))
                            sums[key] += loss(h, targets, t, normalizer=1, head=self.head).kd_sum.item()
                tokens += p.solution_len
        finally:
            model.train(was_training)
        out = {k: v / max(1, tokens) for k, v in sums.items() if stored is not None or k == "full_kd"}
        return {**out, "reference_pairs": len(pairs), "reference_tokens": tokens}

    def log_reference(self) -> None:
        if not self.is_world_process_zero():
            return
        rec = {"step": self.state.global_step, "epoch": round(self.state.epoch or 0.0, 4), **self.reference_kd()}
        metrics_line(self.metrics_path, "train", {**rec, "kd_is": self.kd_is}, self.state.max_steps)


class _ReferenceKL(TrainerCallback):
    """Logs the exact full-vocabulary KL on the reference pairs at the end of each epoch."""

    def __init__(self, trainer: DistillTrainer):
        self.trainer = trainer

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.log_reference()
