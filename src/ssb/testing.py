"""Tiny, randomly initialised chat models for tests and benchmarks (no network, built in seconds).

`make_tiny_model(path)` writes a Llama-architecture causal LM and a byte-level BPE tokenizer with a
ChatML chat template (the same template family as SmolLM2 and Qwen2.5) into `path`, loadable with
`AutoModelForCausalLM.from_pretrained(path)` / `AutoTokenizer.from_pretrained(path)`.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have? The answer is 7.",
    "A train travels 60 miles in 2 hours. What is its speed? #### 30",
    "Solve for x: 2x + 3 = 11. So x = 4. The final answer is \\boxed{4}.",
    "Let's think step by step. First, 12 - 5 = 7. Then 7 * 3 = 21. Final answer: \\boxed{21}",
    "You are a helpful math tutor. Reason step by step and put the final answer in \\boxed{}.",
    "Question: Sara had 15 pencils and gave away 6. How many are left? 15 - 6 = 9. #### 9",
    "0 1 2 3 4 5 6 7 8 9 10 + - * / = ( ) { } \\frac{1}{2} \\sqrt{3} $x^2$ correct wrong mistake",
]


def make_tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text round-trips) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(
    path: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, vocab_size: int = 320
) -> Path:
    """Write a tiny random Llama chat model + tokenizer to `path` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = make_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_arith_pairs(path, tokenizer, n: int, system: str = "You are a helpful math tutor.") -> None:
    """n teacher/student pairs of simple sums (`pairs.jsonl` as the teach stage writes it), for logits and train
    tests: solutions of three lengths, each ending in the end-of-turn token."""
    import json

    with open(path, "w") as f:
        for i in range(n):
            q = f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?"
            sol = f"{i} + {i + 2} = {2 * i + 2}. " + "So the final answer is " * (i % 3) + f"\\boxed{{{2 * i + 2}}}."
            hint = f"{q}\nCorrect: {sol}\nWrong: {i}. Write a solution."
            record = {
                "id": f"arith-{i}",
                "question": q,
                "gold": str(2 * i + 2),
                "teacher_messages": [{"role": "system", "content": system}, {"role": "user", "content": hint}],
                "student_messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                "solution": sol,
                "solution_ids": tokenizer(sol, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
            }
            f.write(json.dumps(record) + "\n")


def start_blocked(code: str, log: Path, timeout: float = 120.0):
    """Start `python -c code` (with this process's sys.path) and return it once its stderr, written to `log`,
    says it is waiting for a lock another process holds ("waiting for it"); fails if it finished instead."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    deadline = time.time() + timeout
    while "waiting for it" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    if proc.poll() is not None or "waiting for it" not in log.read_text():
        raise AssertionError(f"the second process did not wait for the lock:\n{log.read_text()}")
    return proc


def fake_grpo_trainer(model, tokenizer, num_generations: int = 2):
    """The attributes of TRL's GRPOTrainer that a rollout_func reads (ssb.stages.grpo.PolicyRollout)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        num_generations=num_generations,
        model=model,
        processing_class=tokenizer,
        accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        state=SimpleNamespace(global_step=0),
    )
