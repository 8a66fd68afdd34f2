"""`ssb grpo`: the GRPO baseline, TRL's GRPOTrainer on the same questions, prompt, verifier and LoRA as SSB.

Each training question is the plain student prompt (cfg.rollout.system_prompt + question, as chat messages, so
TRL applies the model's chat template); the reward is 1.0 when our verifier judges the completion's answer equal
to the gold answer, else 0.0. The LoRA adapter has the rank, alpha, dropout and target modules of `cfg.train`.
Only the method differs from SSB, so the two adapters can be evaluated side by side.

Outputs, under RUN/grpo/:

    adapter/        the LoRA adapter (PeftModel.from_pretrained) + tokenizer + ssb_base.json naming the base
    metrics.jsonl   one line per logging step: step, epoch, loss, reward, reward_std, kl, entropy, grad_norm, lr,
                    completion_len (mean tokens), clipped_ratio, generated_tokens (cumulative)
    checkpoints/    trainer checkpoints; each also holds ssb_grpo_meter.json (tokens generated and seconds
                    trained so far), so a resumed run keeps counting compute from where the checkpoint left off

`ssb run` with `dr_grpo` among its baselines trains a second one, Dr. GRPO (`dr_grpo_config`), with the same
layout under RUN/dr_grpo/ and a manifest entry of that name.

The manifest's `grpo` entry counts steps, completions, generated_tokens and seconds_training (summed over
resumed sessions) for a compute comparison with SSB's rollout + teach + train stages.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ssb import parallel
from ssb.config import Config
from ssb.engine.policy import PolicyRollout
from ssb.files import atomic_write_json, read_jsonl
from ssb.lifecycle import stage
from ssb.rundir import RunDir
from ssb.training import (
    last_checkpoint,
    log_boundaries_callback,
    lora_config,
    mean_train_loss,
    metrics_line,
    place_tensorboard_logs,
    quiet_trainer_warnings,
    save_adapter,
    train_device,
    trainer_arguments,
    trim_metrics,
)

METER_FILE = "ssb_grpo_meter.json"  # rank 0's; rank r > 0 of a multi-process run: ssb_grpo_meter.rank-r.json


def meter_file(checkpoint: Path) -> Path:
    """Each rank counts the completions it generated, in its own file beside the checkpoint."""
    rank = parallel.current().rank
    return checkpoint / (METER_FILE if rank == 0 else METER_FILE.replace(".json", f".rank-{rank}.json"))


def _or(value, default):
    return default if value is None else value


def completion_text(completion) -> str:
    """The assistant text of one TRL completion: a plain string, or (conversational mode) a list of messages.

    >>> completion_text([{"role": "assistant", "content": "So \\\\boxed{7}."}])
    'So \\\\boxed{7}.'
    """
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def verifier_reward(completions: list, gold: list[str], policy: str = "lenient", **_) -> list[float]:
    """1.0 for each completion whose extracted answer the verifier judges equal to its gold answer, else 0.0.

    TRL calls reward functions with the batch's completions and every dataset column as a keyword list.

    >>> verifier_reward([[{"role": "assistant", "content": "3 + 4 = 7, so \\\\boxed{7}."}],
    ...                  [{"role": "assistant", "content": "The answer is \\\\boxed{8}."}]], gold=["7", "7"])
    [1.0, 0.0]
    """
    from ssb.verify import check

    return [1.0 if check(completion_text(c), g, policy).correct else 0.0 for c, g in zip(completions, gold)]


class Meter:
    """Counts generated completion tokens (fed by the reward function) and training seconds, across resumes."""

    def __init__(self) -> None:
        self.generated_tokens = 0
        self.completions = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def add(self, completion_ids: list) -> None:
        self.completions += len(completion_ids)
        self.generated_tokens += sum(len(ids) for ids in completion_ids)

    def elapsed(self) -> float:
        return self.seconds + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def to_dict(self) -> dict:
        return {
            "generated_tokens": self.generated_tokens,
            "completions": self.completions,
            "seconds": round(self.elapsed(), 2),
        }

    def restore(self, checkpoint: str) -> None:
        path = meter_file(Path(checkpoint))
        if path.exists():
            d = json.loads(path.read_text())
            self.generated_tokens, self.completions = d["generated_tokens"], d["completions"]
            self.seconds = d["seconds"]


def _callback(meter: Meter, metrics_path: Path, name: str = "grpo"):
    """A TrainerCallback: metrics lines on each log, the meter saved into each checkpoint."""
    from transformers import TrainerCallback

    class GRPOLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            meter._t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return  # the final train-summary log has train_loss, not loss
            rec = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs.get("loss"),
                "reward": logs.get("reward"),
                "reward_std": logs.get("reward_std"),
                "kl": logs.get("kl"),
                "entropy": logs.get("entropy"),
                "grad_norm": logs.get("grad_norm"),
                "lr": logs.get("learning_rate"),
                "completion_len": logs.get("completions/mean_length"),
                "clipped_ratio": logs.get("completions/clipped_ratio"),
                "generated_tokens": meter.generated_tokens,
            }
            metrics_line(metrics_path, name, rec, state.max_steps)

        def on_train_end(self, args, state, control, **kw):
            meter.seconds, meter._t0 = meter.elapsed(), None

        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                atomic_write_json(meter_file(ckpt), meter.to_dict())

    return GRPOLog()


def build_trainer(cfg: Config, run: RunDir, meter: Meter, name: str = "grpo", questions: list[dict] | None = None):
    """TRL's GRPOTrainer for this config: the base model, LoRA from cfg.train, the verifier reward; files under
    RUN/<name> (grpo or dr_grpo). `questions`: the training questions (default: loaded from cfg.data.train)."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from ssb.data import question_records
    from ssb.models import load_model, load_tokenizer
    from ssb.prompts import student_messages

    gc = cfg.grpo
    questions = question_records(cfg.data.train) if questions is None else questions
    if not questions:
        raise ValueError(f"no training questions from data.train ({cfg.data.train.source})")
    data = Dataset.from_list(
        [
            {"prompt": student_messages(q["question"], cfg.rollout.system_prompt), "gold": q["answer"], "id": q["id"]}
            for q in questions
        ]
    )
    device = train_device(cfg)
    common = trainer_arguments(
        cfg,
        device,
        run.rl_checkpoints(name),
        learning_rate=gc.learning_rate,
        logging_steps=gc.logging_steps,
        save_steps=gc.save_steps,
        save_total_limit=gc.save_total_limit,
    )
    args = TRLGRPOConfig(
        **common,
        num_generations=gc.num_generations,
        temperature=gc.temperature,
        top_k=gc.top_k,
        top_p=gc.top_p,
        max_completion_length=gc.max_completion_length,
        beta=gc.beta,
        loss_type=gc.loss_type,
        scale_rewards=gc.scale_rewards,
        # Memory: TRL's forward/backward materialises [completions, length, vocabulary] float32 logits (and
        # their log-softmax and gradient): for 32 completions x ~300 tokens x 49k that is ~1.9 GB per copy, and
        # held 9 GB in the quick preset. So one question's group per forward/backward pass, accumulated over the
        # step's questions: the same generation round (generation batch = batch_size x num_generations) and the
        # same loss (dapo normalises by the generation batch's tokens) per optimizer step, at 1/batch_size the
        # activation memory.
        per_device_train_batch_size=gc.num_generations,
        gradient_accumulation_steps=gc.batch_size * gc.grad_accum,
        num_train_epochs=gc.epochs,
        max_steps=gc.max_steps or -1,
        use_vllm=False,
        log_completions=False,
    )
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_model(cfg.model, device=device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    policy = cfg.rollout.policy

    def correctness(prompts, completions, completion_ids, gold, **kw) -> list[float]:
        meter.add(completion_ids)
        return verifier_reward(completions, gold, policy)

    narrow_logprob_tiles(device)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correctness,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora_config(cfg),
        callbacks=[_callback(meter, run.rl_metrics(name), name), log_boundaries_callback()],
        rollout_func=PolicyRollout(cfg, manifest=(run, name)) if gc.generation == "ssb" else None,
    )
    place_tensorboard_logs(trainer, run.rl_dir(name) / "tb")
    trainer.remove_callback(PrinterCallback)  # our callback prints one line per step; TRL's raw dict is noise
    return trainer, tok, len(questions)


# Vocabulary columns per tile of TRL's fused log-prob head on devices without Triton. TRL 1.16 projects tiles of
# [tokens, 32768] in fp32 and, without Triton (CPU), scores every position of the batch, prompts included; in the
# backward one tile and its temporaries made the whole stage's peak (quick preset; located with a sampling
# profiler). Narrower tiles give the same log-probs with a quarter of that memory per tile.
CPU_LOGPROB_TILE = 8192


def narrow_logprob_tiles(device: str) -> None:
    """Use CPU_LOGPROB_TILE-wide vocabulary tiles in TRL's fused log-prob head off CUDA (a module constant of
    trl.trainer.utils, read at each call; left alone where this TRL version does not have it)."""
    import trl.trainer.utils as trl_utils

    if not device.startswith("cuda") and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, CPU_LOGPROB_TILE)


def dr_grpo_config(cfg: Config) -> Config:
    """The Dr. GRPO baseline (Liu et al. 2025, arXiv 2503.20783): GRPO's settings with TRL's `dr_grpo` loss (token
    losses summed and divided by a constant, max_completion_length, not by each completion's length) and rewards
    not scaled by the group's standard deviation (`scale_rewards: none`), the paper's two changes."""
    return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, loss_type="dr_grpo", scale_rewards="none"))


def grpo(cfg: Config, run: RunDir, force: bool = False, name: str = "grpo", budget_run: RunDir | None = None) -> dict:
    """Train the RL baseline `name` ("grpo", or "dr_grpo" with `dr_grpo_config(cfg)`) into RUN/<name>.

    budget_run: with grpo.match_compute=tokens, the run directory whose SSB stages set the budget (default: `run`;
    an experiment passes the same seed's SSB arm)."""
    out, ckpts, metrics, adapter = (
        run.rl_dir(name),
        run.rl_checkpoints(name),
        run.rl_metrics(name),
        run.rl_adapter(name),
    )
    tc = cfg.train  # the LoRA and optimizer settings shared with SSB
    gc = cfg.grpo
    steps_note = ""
    if gc.match_compute == "tokens":
        from ssb.compute import matched_grpo_steps

        steps, steps_note = matched_grpo_steps(cfg, budget_run or run)
        gc = dataclasses.replace(gc, max_steps=steps)
        cfg = dataclasses.replace(cfg, grpo=gc)
    grpo_cfg = dataclasses.asdict(gc)
    for key, default in (("scale_rewards", "group"), ("match_compute", "none")):
        if grpo_cfg[key] == default:  # runs from before these options keep their hash
            del grpo_cfg[key]
    parts = (
        cfg.model,
        cfg.data,
        grpo_cfg,
        tc.lora_r,
        tc.lora_alpha,
        tc.lora_dropout,
        tc.target_modules,
        tc.lr_scheduler,
        tc.max_grad_norm,
        tc.weight_decay,
        tc.gradient_checkpointing,
        cfg.rollout.system_prompt,
        cfg.rollout.policy,
        cfg.seed,
    )

    def check() -> list[dict]:  # bad or too-long questions fail here, before anything in the run directory changes
        from ssb.data import question_records
        from ssb.prompts import student_messages
        from ssb.stages.inputs import fitting_questions

        spec = cfg.data.train
        questions = question_records(spec)
        prompts = [student_messages(q["question"], cfg.rollout.system_prompt) for q in questions]
        return fitting_questions(
            cfg,
            cfg.model,
            questions,
            prompts,
            gc.max_completion_length,
            setting="grpo.max_completion_length",
            spec=spec,
            spec_key="data.train",
        )

    from ssb.data import data_files

    inputs = data_files(cfg.data.train)
    with stage(run, name, parts, inputs, [out], force=force, check=check, every_rank=True) as st:
        if st is None:
            return (run.stage_entry(name) or {}).get("counts", {})
        if steps_note:
            st.say(f"[{name}] {steps_note}")
        out.mkdir(parents=True, exist_ok=True)
        meter = Meter()
        with quiet_trainer_warnings():
            trainer, tok, n_questions = build_trainer(cfg, run, meter, name, st.checked)
        st.say(
            f"[{name}] {n_questions} questions x {gc.num_generations} completions, {gc.batch_size} questions "
            f"per step, lr {gc.learning_rate}, beta {gc.beta}, loss {gc.loss_type}, LoRA r={cfg.train.lora_r}"
        )
        resume = last_checkpoint(ckpts, st.resumed)
        main = parallel.current().is_main
        if resume:
            st.say(f"[{name}] resuming from {resume}")
            meter.restore(resume)
            if main:
                trim_metrics(metrics, int(resume.rsplit("-", 1)[-1]))
        elif metrics.exists() and main:
            metrics.unlink()
        try:
            with quiet_trainer_warnings():
                result = trainer.train(resume_from_checkpoint=resume)
        finally:
            if isinstance(trainer.rollout_func, PolicyRollout):
                trainer.rollout_func.close()  # vLLM's engine processes
        save_adapter(cfg, trainer, adapter)
        ranks = parallel.all_gather(meter.to_dict())  # every rank generated its share of the completions
        meter.generated_tokens = sum(m["generated_tokens"] for m in ranks)
        meter.completions = sum(m["completions"] for m in ranks)
        rows = read_jsonl(metrics)
        rewards = [r["reward"] for r in rows if r.get("reward") is not None]
        st.counts.update(
            questions=n_questions,
            steps=trainer.state.global_step,
            completions=meter.completions,
            generated_tokens=meter.generated_tokens,
            seconds_training=round(meter.elapsed(), 2),
            train_loss=round(_or(mean_train_loss(metrics), result.training_loss), 6),  # every step, resumes included
            reward_first=rewards[0] if rewards else None,
            reward_last=rewards[-1] if rewards else None,
            loss_type=gc.loss_type,
            max_steps=gc.max_steps,
        )
        st.say(
            f"[{name}] done: {trainer.state.global_step} steps, {meter.generated_tokens} tokens generated in "
            f"{meter.completions} completions; adapter -> {adapter}"
        )
        return dict(st.counts)
