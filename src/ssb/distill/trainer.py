"""`DistillTrainer`: a Hugging Face `Trainer` whose loss is the SSB distillation loss on solution tokens.

Everything else (optimizer, schedule, gradient accumulation and clipping, checkpoints and resume, seeded data order,
accelerate / DDP / DeepSpeed / FSDP) is the stock Trainer. Loss normalisation: the Trainer counts the solution
tokens of the whole accumulated batch across processes (`num_items_in_batch`, from the collator's shift_labels);
each micro-batch's loss is its token sum divided by that count, so accumulation and data parallelism give the
token-level mean over the effective batch.

The student's final hidden states at the solution positions go through the output head inside the loss, a chunk
at a time. Under FSDP or DeepSpeed ZeRO-3 (head weights sharded outside the forward pass) the model itself
projects only the solution positions (`logits_to_keep` = a boolean mask) and the loss starts from those logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from ssb.distill.loss import DenseTeacher, DistillLoss, OutputHead, SparseTeacher, final_hidden
from ssb.training import log_boundaries_callback, metrics_line


class DistillTrainer(Trainer):
    def __init__(
        self, *args, distill_loss: DistillLoss, teacher: str, metrics_path: str | Path | None = None, **kwargs
    ):
        """teacher: 'stored' (sparse rows in the batch), 'online' (frozen base = adapter disabled) or 'none'."""
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
            "ce": logs.get("ce"),
            "grad_norm": logs.get("grad_norm"),
            "lr": logs.get("learning_rate"),
            "completion_len": logs.get("completion_len"),
        }
        metrics_line(self.metrics_path, "train", rec, self.state.max_steps)
