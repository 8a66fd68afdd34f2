"""The typed configuration: one dataclass per stage, each field documented, and the value checks.

Each field carries its documentation in `metadata["help"]` (shown by `--help-config`). Defaults are the
paper's settings where the paper gives one. Loading from YAML and overrides lives in `ssb.config.loading`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

EMBEDDED_MODEL = "smollm2-135m-instruct"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful math tutor. Solve the problem step by step, explaining each step briefly. "
    "At the end, write the final answer as \\boxed{answer}."
)


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


def opt(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with its documentation attached (shown by `ssb <verb> --help-config`)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    if callable(default):  # a dataclass type or a factory
        return field(default_factory=default, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class DatasetSpec:
    """Where a set of (question, answer) pairs comes from."""

    source: str = opt(
        "arith",
        "'arith' (built-in word-problem generator), a benchmark name (gsm8k, math500, "
        "aime24, amc23), a local .jsonl/.json/.parquet file, or a Hugging Face Hub dataset id",
    )
    split: str = opt(
        "train",
        "Split: 'train' or 'test' for arith and benchmarks, any split name for Hub datasets. arith also has "
        "'val' (a quarter of the training calculations, for choosing settings) and 'fit' (the other training "
        "calculations, to train on while validating); never the test ones (docs/quality.md)",
    )
    subset: str | None = opt(None, "Hub dataset config name (e.g. 'main' for openai/gsm8k)")
    level: int = opt(1, "arith only: difficulty 1 (one operation), 2 (two steps) or 3 (three steps)")
    limit: int | None = opt(None, "Use at most this many examples (after offset; arith: 500 when unset)")
    offset: int = opt(0, "Skip this many examples first (take fresh questions in later rounds)")
    question_field: str | None = opt(None, "Field holding the question (auto: question, problem, prompt)")
    answer_field: str | None = opt(None, "Field holding the gold answer (auto: answer, final_answer, solution)")
    id_field: str | None = opt(None, "Field holding a stable id (auto: id, unique_id; else file line number)")
    answer_format: Literal["auto", "gsm8k", "math", "aime", "amc", "plain"] = opt(
        "auto", "How to normalise gold answers: gsm8k ('#### 2,125'), math (LaTeX), aime ('025'), amc ('27.0')"
    )
    skip_bad_records: bool = opt(False, "Skip malformed records with a counted warning instead of failing")


@dataclass
class DataConfig:
    train: DatasetSpec = opt(DatasetSpec, "Training questions (rollouts, curation, teaching)")


@dataclass
class RolloutConfig:
    k: int = opt(4, "Rollouts sampled per question (paper: 4)")
    temperature: float = opt(0.8, "Sampling temperature (paper: 0.8)")
    top_k: int = opt(50, "Top-k sampling, 0 = off (paper: 50)")
    top_p: float = opt(1.0, "Nucleus sampling threshold, 1.0 = off")
    max_new_tokens: int = opt(512, "Longest rollout in tokens; longer ones are cut and marked 'length'")
    batch_size: int = opt(64, "Sequences generated at once")
    system_prompt: str = opt(DEFAULT_SYSTEM_PROMPT, "Math-tutor system prompt used for rollouts, student and eval")
    policy: Literal["boxed", "lenient"] = opt("lenient", "Answer extraction: 'boxed' (paper) or 'lenient'")


@dataclass
class CurateConfig:
    negative: bool = opt(True, "Show the most common wrong rollout in the hint; false = 'no-negative' ablation")
    template: str | None = opt(
        None,
        "Path of a hinted-prompt template with {question}, {correct}, {wrong} "
        "placeholders (default: built-in; no-negative uses {question}, {correct}), or "
        "'short': a built-in terse instruction that tiny models follow more often",
    )
    order: Literal["correct_first", "wrong_first"] = opt(
        "correct_first",
        "Which attempt the hint shows first (the paper: correct first); 'wrong_first' is the hint-order ablation "
        "(configs/ablations/wrong-first.yaml). A template file must place its placeholders in this order",
    )


@dataclass
class TeachConfig:
    temperature: float = opt(0.4, "Teacher sampling temperature (paper: 0.4)")
    top_k: int = opt(50, "Top-k sampling for the teacher, 0 = off")
    top_p: float = opt(1.0, "Nucleus sampling threshold, 1.0 = off")
    max_new_tokens: int = opt(512, "Longest teacher solution in tokens")
    attempts: int = opt(1, "Teacher tries per question until one verifies (paper: 1)")
    target_pairs: int | None = opt(
        None,
        "Reach this many verified pairs (paper: 256) by drawing further batches of data.train.limit fresh "
        "training questions (rollout, curate, teach each, in RUN/batches/) until the target or max_batches; "
        "null = off: one batch. Further batches add pairs only up to the target (the first batch's are all kept); "
        "the yield funnel is in the manifest's teach counts",
    )
    max_batches: int = opt(
        8, "With target_pairs: at most this many question batches in all (the run's own first batch included)"
    )
    batch_size: int = opt(64, "Sequences generated at once")


@dataclass
class LogitsConfig:
    mode: Literal["offline", "online"] = opt(
        "offline", "offline: store sparse teacher top-k once; online: run the frozen teacher in each training step"
    )
    store: Literal["topk", "sampled", "hybrid", "hidden"] = opt(
        "hybrid",
        "offline storage (docs/teacher-store.md): 'topk' keeps top_k ids + log-probs + the tail mass per token "
        "(4k+4 bytes with 16-bit ids, else 6k+4; biased: the tail is one bucket); 'sampled' keeps `samples` ids "
        "drawn from the teacher at T with their log-probs (4S bytes; an unbiased estimate, seeded by (seed, "
        "example id)); 'hybrid' keeps the top_k head exactly plus `samples` draws from the tail (4(k+S)+4 bytes; "
        "unbiased); 'hidden' keeps the teacher's final hidden state in float16 (2 x hidden size bytes) and "
        "recomputes the exact full-vocabulary distribution during training. Default hybrid: its LoRA gradient "
        "is closest to the full KL's at 1 KB/token (benchmarks/README.md, 'Storage schemes')",
    )
    top_k: int = opt(
        0,
        "Exact head: teacher tokens kept per position with store=topk (the rest is one tail bucket), or the head "
        "of store=hybrid; 0 = auto: topk, the largest k within 1,000 bytes/token (249 for vocabularies up to "
        "65,536, else 166); hybrid, 64 (the benchmark's best head; the draws fill the rest)",
    )
    samples: int = opt(
        0,
        "Draws per token with store=sampled or hybrid; 0 = auto: fill 1,000 bytes/token with the head "
        "(sampled: 250 draws with 16-bit ids, else 166)",
    )
    reference_pairs: int = opt(
        4,
        "Pairs (the first by id) whose teacher hidden states are also stored in full (RUN/logits/reference/), "
        "so training logs the exact full-vocabulary KL on them each epoch beside the stored scheme's estimate; "
        "0 = off",
    )
    batch_size: int = opt(8, "Sequences per teacher forward pass")
    shard_size: int = opt(256, "Examples per safetensors shard")


@dataclass
class TrainConfig:
    lora_r: int = opt(32, "LoRA rank (paper: 32)")
    lora_alpha: int = opt(32, "LoRA alpha (paper: 32)")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    target_modules: list[str] = opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Modules that get LoRA adapters (paper: all attention and MLP projections)",
    )
    learning_rate: float = opt(2e-4, "Peak learning rate (paper: 2e-4)")
    lr_scheduler: str = opt("linear", "Learning-rate schedule (any transformers scheduler name)")
    warmup_ratio: float = opt(0.0, "Share of steps spent warming up the learning rate, in [0, 1)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm")
    batch_size: int = opt(4, "Examples per device per step (paper: 4)")
    grad_accum: int = opt(1, "Gradient accumulation steps")
    epochs: float = opt(3.0, "Training epochs (paper: 3)")
    temperature: float = opt(2.0, "Distillation temperature T; loss is multiplied by T^2 (paper: 2)")
    kd_weight: float = opt(1.0, "Weight of KL(teacher || student) (paper: 1)")
    ce_weight: float = opt(0.0, "Weight of cross-entropy on the solution tokens (paper: 0; SFT baseline: 1, kd 0)")
    max_length: int = opt(1024, "Longest student sequence (prompt + solution) in tokens; longer pairs are dropped")
    max_pairs: int | None = opt(
        None,
        "Train on the first this many pairs of pairs.jsonl (in curation order) only; null = all. Arms that differ "
        "only in it share rollouts, teacher solutions and logits: a gain-vs-pairs curve from one teach run",
    )
    logging_steps: int = opt(1, "Log every this many optimizer steps")
    save_steps: int = opt(50, "Checkpoint every this many optimizer steps (resume restarts from the last)")
    save_total_limit: int | None = opt(2, "Keep only the newest this many checkpoints in RUN/train (null: all)")
    gradient_checkpointing: bool = opt(
        True,
        "Recompute activations in the backward pass: far less memory for "
        "long solutions, about a third more compute (the paper's scripts use it)",
    )
    merge: bool = opt(False, "Also write a merged model (base + LoRA) to the run directory")
    report_to: list[str] = opt(
        [],
        "Trainer integrations that also receive the training logs (SSB, SFT and GRPO), "
        "e.g. [tensorboard] (pip install 'ssb[tensorboard]'; logs in RUN/train/tb and RUN/grpo/tb), "
        "[wandb] or [trackio]; empty: only RUN/metrics.jsonl",
    )
    mixed_precision: Literal["auto", "none", "bf16", "fp16"] = opt(
        "auto",
        "Autocast for training (SSB, SFT and GRPO; weights and optimizer stay in `dtype`). auto: bf16 on "
        "CUDA with bf16 and on CPUs whose bf16 matmuls beat fp32 (`ssb.models.cpu_has_fast_bf16`), fp16 on older CUDA "
        "GPUs, else none. fp16 needs CUDA",
    )


@dataclass
class GRPOConfig:
    """The GRPO baseline (`ssb grpo`, TRL's GRPOTrainer): same questions, system prompt, verifier and LoRA as SSB
    (rank, alpha, dropout, targets, lr schedule, grad clipping, weight decay and activation checkpointing come from
    `train`), so only the method differs. One seed for the run: the top-level `seed`."""

    generation: Literal["ssb", "trl"] = opt(
        "ssb",
        "Who samples the completions: 'ssb' (through TRL's rollout_func, with the backend generation_backend "
        "picks: our batched engine, or vLLM serving the policy's LoRA adapter anew each step; same sampling "
        "settings) or 'trl' (TRL's own model.generate)",
    )
    num_generations: int = opt(
        4, "Completions sampled per question: the group whose rewards are normalised (like rollout.k = 4); at least 2"
    )
    temperature: float = opt(0.8, "Sampling temperature (the rollouts' 0.8)")
    top_k: int = opt(50, "Top-k sampling, 0 = off (the rollouts' 50)")
    top_p: float = opt(1.0, "Nucleus sampling threshold, 1.0 = off")
    max_completion_length: int = opt(512, "Longest completion in tokens (the rollouts' max_new_tokens)")
    learning_rate: float = opt(
        1e-5,
        "Peak learning rate. TRL's GRPO default 1e-6 is for full fine-tuning; "
        "LoRA needs about 10x that (TRL's 'LoRA without regret' guide)",
    )
    beta: float = opt(
        0.0,
        "KL coefficient against the base model (adapter off); 0 = no KL term and no reference "
        "pass (TRL's default; the original GRPO paper used 0.04)",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = opt(
        "dapo",
        "Token-loss normalisation (TRL's default 'dapo': over all completion tokens in the batch; 'dr_grpo': a "
        "constant, max_completion_length; 'grpo': each completion's length; 'bnpo': the local batch's tokens)",
    )
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group",
        "Divide advantages by the reward std of the group (TRL default), of the batch, or not at all "
        "('none': Dr. GRPO's choice; the dr_grpo baseline sets it)",
    )
    match_compute: Literal["none", "tokens"] = opt(
        "none",
        "'tokens': set max_steps so GRPO's generated + trained tokens match SSB's rollout + teach + logits + "
        "train tokens of the same run directory (the SSB stages must have run; rule in docs/quality.md); "
        "'none': use max_steps / epochs as given",
    )
    epochs: float = opt(1.0, "Passes over the training questions")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides epochs; null: use epochs)")
    batch_size: int = opt(4, "Questions per device per optimizer step; each brings num_generations completions")
    grad_accum: int = opt(1, "Gradient accumulation steps (one generation round per optimizer step)")
    logging_steps: int = opt(1, "Log every this many optimizer steps to RUN/grpo/metrics.jsonl")
    save_steps: int = opt(50, "Checkpoint every this many optimizer steps (resume restarts from the last)")
    save_total_limit: int | None = opt(2, "Keep only the newest this many checkpoints (null: all)")

    def __post_init__(self) -> None:
        for key, ok, what in (
            ("num_generations", self.num_generations >= 2, "must be >= 2 (GRPO compares completions within a group)"),
            ("max_completion_length", self.max_completion_length >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("beta", self.beta >= 0, "must be >= 0"),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 or null"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("save_steps", self.save_steps >= 1, "must be >= 1"),
        ):
            if not ok:
                raise ConfigError(f"config key 'grpo.{key}': {what}, got {getattr(self, key)!r}")


@dataclass
class EvalConfig:
    data: DatasetSpec = opt(lambda: DatasetSpec(split="test", limit=200), "Held-out questions")
    n: int = opt(1, "Samples per problem (pass@1 is averaged over them)")
    temperature: float = opt(0.0, "0 = greedy")
    top_k: int = opt(0, "Top-k sampling, 0 = off")
    top_p: float = opt(1.0, "Nucleus sampling threshold")
    max_new_tokens: int = opt(512, "Longest answer in tokens")
    batch_size: int = opt(64, "Sequences generated at once")
    policy: Literal["boxed", "lenient"] = opt("lenient", "Answer extraction policy")


@dataclass
class Config:
    model: str = opt(EMBEDDED_MODEL, "Base model: the embedded alias, a Hub id, or a local directory")
    device: str = opt("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights for training and teacher logits. auto: bf16 on CUDA, fp32 on CPU"
    )
    generation_dtype: Literal["auto", "model", "float32", "bfloat16", "float16"] = opt(
        "auto",
        "Weights for the generating stages (rollout, teach, eval): a copy of the model in this dtype. "
        "auto: bf16 on CUDA and on CPUs whose bf16 matmuls beat fp32 (AMX; AVX512-BF16 where a probe measures "
        "it faster, `ssb.models.cpu_has_fast_bf16`), else "
        "`dtype`; model: always `dtype`. The dtype is recorded in each record's `backend` field",
    )
    generation_memory_mib: int | None = opt(
        None,
        "Most memory the generation engine's KV cache may take, in MiB (rollout, teach, eval, GRPO rollouts). "
        "Fewer sequences run at once when batch_size of them could not all reach max_new_tokens within it; a "
        "budget below one sequence is an error. null: a quarter of the memory available when a stage starts",
    )
    generation_backend: Literal["auto", "engine", "vllm"] = opt(
        "auto",
        "Who generates in rollout, teach and eval: 'engine' (ssb's own engine), 'vllm' (vLLM; install "
        "with scripts/install-vllm.sh, docs/vllm.md) or auto: vLLM where it imports, runs on this device and "
        "supports the model, else the engine (one line says which and why). Teacher logits stay on torch; GRPO's "
        "rollouts stay on the engine (its weights change every step). Recorded in each record's `backend` field",
    )
    vllm_kv_cache_gib: float = opt(
        0.0,
        "vLLM's KV cache in GiB; 0 = auto: room for batch_size sequences of (longest prompt + max_new_tokens) "
        "tokens, capped at half the memory available at start-up",
    )
    vllm_tensor_parallel: int = opt(
        1,
        "GPUs per vLLM engine (tensor parallelism) for a model too large for one. Under torchrun / accelerate / "
        "SLURM each rank runs its own engine on its own vllm_tensor_parallel GPUs of the node (docs/parallel.md)",
    )
    trust_remote_code: bool = opt(False, "Allow model code from the Hub (only if you trust it)")
    seed: int = opt(0, "Seed for sampling, curation choices and training order")
    data: DataConfig = opt(DataConfig, "Training data")
    rollout: RolloutConfig = opt(RolloutConfig, "Stage 1: rollouts")
    curate: CurateConfig = opt(CurateConfig, "Stage 2: curation")
    teach: TeachConfig = opt(TeachConfig, "Stage 3: teacher solutions")
    logits: LogitsConfig = opt(LogitsConfig, "Stage 4: teacher logits")
    train: TrainConfig = opt(TrainConfig, "Stage 5: distillation")
    eval: EvalConfig = opt(EvalConfig, "Stage 6: evaluation")
    grpo: GRPOConfig = opt(GRPOConfig, "GRPO baseline (`ssb grpo`)")
    baselines: list[str] = opt(
        ["sft", "grpo"],
        "Baselines `ssb run` trains and evaluates beside SSB: 'sft' "
        "(same pairs, cross-entropy only), 'grpo' (TRL GRPO, same questions and reward) and 'dr_grpo' (the same "
        "GRPO settings with Dr. GRPO's loss and unscaled rewards, in RUN/dr_grpo)",
    )
    rounds: int = opt(
        1,
        "Iterated SSB: rounds > 1 rerun the pipeline with the previous round's merged student as "
        "the model, on fresh questions (data.train.offset advances by data.train.limit)",
    )

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------------------------------------- checks

_RULES: dict[str, tuple[str, typing.Callable[[Any], bool]]] = {
    "data.train.level": ("must be 1, 2 or 3", lambda v: v in (1, 2, 3)),
    "rollout.k": ("must be >= 1", lambda v: v >= 1),
    "teach.attempts": ("must be >= 1", lambda v: v >= 1),
    "teach.target_pairs": ("must be >= 1 or null", lambda v: v is None or v >= 1),
    "train.max_pairs": ("must be >= 1 or null", lambda v: v is None or v >= 1),
    "teach.max_batches": ("must be >= 1", lambda v: v >= 1),
    "logits.top_k": ("must be >= 0 (0 = auto)", lambda v: v >= 0),
    "logits.samples": ("must be >= 0 (0 = auto)", lambda v: v >= 0),
    "logits.reference_pairs": ("must be >= 0 (0 = off)", lambda v: v >= 0),
    "train.lora_r": ("must be >= 1", lambda v: v >= 1),
    "train.lora_alpha": ("must be >= 1", lambda v: v >= 1),
    "train.lora_dropout": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    "train.weight_decay": ("must be >= 0", lambda v: v >= 0),
    "train.max_grad_norm": ("must be >= 0 (0 = no clipping)", lambda v: v >= 0),
    "train.kd_weight": ("must be >= 0", lambda v: v >= 0),
    "train.ce_weight": ("must be >= 0", lambda v: v >= 0),
    "train.max_length": ("must be >= 1", lambda v: v >= 1),
    "train.logging_steps": ("must be >= 1", lambda v: v >= 1),
    "train.save_steps": ("must be >= 1", lambda v: v >= 1),
    "seed": ("must be >= 0", lambda v: v >= 0),
    "train.batch_size": ("must be >= 1", lambda v: v >= 1),
    "train.grad_accum": ("must be >= 1", lambda v: v >= 1),
    "train.epochs": ("must be > 0", lambda v: v > 0),
    "train.temperature": ("must be > 0", lambda v: v > 0),
    "train.learning_rate": ("must be > 0", lambda v: v > 0),
    "train.warmup_ratio": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    "eval.n": ("must be >= 1", lambda v: v >= 1),
    "rounds": ("must be >= 1", lambda v: v >= 1),
    "generation_memory_mib": ("must be > 0 or null", lambda v: v is None or v > 0),
    "vllm_kv_cache_gib": ("must be >= 0 (0 = auto)", lambda v: v >= 0),
    "vllm_tensor_parallel": ("must be >= 1", lambda v: v >= 1),
}


def validate(cfg: Config) -> None:
    """Check value ranges that types alone cannot express. Raises ConfigError naming the key."""
    flat = flatten(to_dict(cfg))
    for key, value in flat.items():  # NaN passes every `<` test and inf most; neither is ever meant
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
    for key, (what, ok) in _RULES.items():
        if key in flat and not ok(flat[key]):
            raise ConfigError(f"config key '{key}': {what}, got {flat[key]!r}")
    for key, value in flat.items():
        last = key.rsplit(".", 1)[-1]
        if last in ("temperature",) and value < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {value!r}")
        if last in ("max_new_tokens", "batch_size", "shard_size") and value < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, got {value!r}")
        if last == "top_p" and not 0 < value <= 1:
            raise ConfigError(f"config key '{key}': must be in (0, 1], got {value!r}")
        if last in ("top_k", "offset") and value < 0:
            raise ConfigError(f"config key '{key}': must be >= 0, got {value!r}")
        if last in ("limit", "save_total_limit") and value is not None and value < 1:
            raise ConfigError(f"config key '{key}': must be >= 1, or null for no limit, got {value!r}")
    for b in cfg.baselines:
        if b not in ("sft", "grpo", "dr_grpo"):
            raise ConfigError(f"config key 'baselines': unknown baseline {b!r} (choose from sft, grpo, dr_grpo)")
    if cfg.rounds > 1 and cfg.teach.target_pairs is not None:
        raise ConfigError(
            "config keys 'rounds' and 'teach.target_pairs': both draw fresh training questions after the first "
            "data.train.limit; use one of them"
        )
    if cfg.rounds > 1 and cfg.data.train.limit is None:
        raise ConfigError("config key 'rounds': iterated rounds need data.train.limit (questions per round)")
    if cfg.train.kd_weight == 0 and cfg.train.ce_weight == 0:
        raise ConfigError("config keys 'train.kd_weight' and 'train.ce_weight': at least one must be > 0")


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
