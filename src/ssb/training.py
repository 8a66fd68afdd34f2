"""The training scaffold that SSB, SFT and GRPO share, so only the method differs between them.

One LoRA config, one set of Trainer arguments (optimizer, schedule, precision, checkpointing, reporting), one
metrics file format, one way to save an adapter next to the name of its base model, and one way to resume.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

from ssb.config import Config
from ssb.files import atomic_write_json, atomic_write_text

# beside every adapter we write: the base model it was trained on, and (information only: loading never reads it as
# permission) whether that run trusted the base's remote code
ADAPTER_BASE_FILE = "ssb_base.json"


def train_device(cfg: Config) -> str:
    """cfg.device resolved; under `accelerate launch` / torchrun each process takes the GPU of its local rank."""
    from ssb.models import resolve_device

    dev = resolve_device(cfg.device)
    if dev == "cuda" and "LOCAL_RANK" in os.environ:
        dev = f"cuda:{os.environ['LOCAL_RANK']}"
    return dev


def lora_config(cfg: Config):
    """The student adapter (rank, alpha, dropout, targets from cfg.train), for SSB, SFT and GRPO alike."""
    from peft import LoraConfig

    tc = cfg.train
    return LoraConfig(
        r=tc.lora_r,
        lora_alpha=tc.lora_alpha,
        lora_dropout=tc.lora_dropout,
        target_modules=list(tc.target_modules),
        task_type="CAUSAL_LM",
    )


def trainer_arguments(
    cfg: Config,
    device: str,
    output_dir: Path,
    *,
    learning_rate: float,
    logging_steps: int,
    save_steps: int,
    save_total_limit: int | None,
) -> dict:
    """Keyword arguments common to transformers' TrainingArguments and TRL's GRPOConfig."""
    from ssb.models import resolve_mixed_precision

    tc = cfg.train
    precision = resolve_mixed_precision(tc.mixed_precision, device)
    return dict(
        output_dir=str(output_dir),
        learning_rate=learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        # transformers 5 has no warmup_ratio: a float warmup_steps below 1 is read as a share of the steps
        warmup_steps=tc.warmup_ratio,
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        logging_steps=logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not device.startswith("cuda"),
        report_to=list(tc.report_to) or "none",
        disable_tqdm=True,
        activation_checkpointing=tc.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None,
    )


def place_tensorboard_logs(trainer, logging_dir: Path) -> None:
    """With report_to tensorboard, write its event files to `logging_dir` (transformers 5 has no logging_dir
    argument; its default is a dated folder under output_dir)."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(logging_dir)


def metrics_line(path: Path | None, tag: str, rec: dict, max_steps) -> dict:
    """Print one training log line and append it to a metrics JSONL file (non-finite numbers become null)."""
    rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    parts = [f"{k} {v:.4g}" for k, v in rec.items() if k not in ("step", "epoch") and isinstance(v, float)]
    print(
        f"[{tag}] step {rec['step']}/{max_steps or '?'} epoch {rec.get('epoch') or 0:.2f} " + " ".join(parts),
        flush=True,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def log_boundaries_callback():
    """A TrainerCallback that also logs at every checkpoint and at the last step, on top of every
    `logging_steps`: then each metrics line's loss covers exactly the steps since the line before, whatever the
    step a resumed run restarts from, and the lines together cover every step (`mean_train_loss`)."""
    from transformers import TrainerCallback

    class LogBoundaries(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            every = state.save_steps or args.save_steps
            at_checkpoint = isinstance(every, int) and every > 0 and state.global_step % every == 0
            if at_checkpoint or state.global_step >= state.max_steps:
                control.should_log = True

    return LogBoundaries()


def mean_train_loss(path: Path) -> float | None:
    """The mean training loss over all steps of a run, resumed sessions included, from its metrics file: each
    line's loss is the mean over the steps since the previous line (`log_boundaries_callback`), so lines are
    weighted by those steps. None when no line has a loss."""
    from ssb.files import read_jsonl

    total = steps = 0.0
    prev = 0
    for rec in sorted(read_jsonl(path, repair=False), key=lambda r: r.get("step", 0)):
        step, loss = rec.get("step", 0), rec.get("loss")
        if isinstance(loss, (int, float)) and step > prev:
            total += loss * (step - prev)
            steps += step - prev
        prev = max(prev, step)
    return total / steps if steps else None


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines logged after the checkpoint a resumed run restarts from (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if rec.get("step", 0) <= last_step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def last_checkpoint(checkpoints: Path, resumed: bool) -> str | None:
    """The checkpoint a resumed stage restarts from (None: start over)."""
    if not resumed or not checkpoints.exists():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints))


def save_adapter(cfg: Config, trainer, target: Path) -> None:
    """The adapter + tokenizer + ssb_base.json, swapped into `target` whole. Every process must call this (FSDP
    and ZeRO-3 gather the weights); only the main one writes."""
    tmp = target.with_name(target.name + ".tmp")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if main:
        trainer.processing_class.save_pretrained(tmp)
        atomic_write_json(tmp / ADAPTER_BASE_FILE, {"model": cfg.model, "trust_remote_code": cfg.trust_remote_code})
        (tmp / "training_args.bin").unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    trainer.accelerator.wait_for_everyone()


@contextlib.contextmanager
def quiet_trainer_warnings():
    """peft and TRL 1.16 still call transformers' renamed gradient_checkpointing_* methods (a warning per call),
    and TRL flags its experimental rollout_func, whose version we pin."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "You are using 'rollout_func'", UserWarning)
        yield
