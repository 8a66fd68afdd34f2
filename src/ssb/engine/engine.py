"""Batched text generation for every SSB stage that samples from a model (rollouts, teacher solutions, eval).

`Engine.generate(prompts, n, params)` returns n completions per prompt. It runs continuous batching over
KV caches that grow with the tokens in flight (`ssb.engine.cache.SlotModel`, paged in segments, within a memory
budget): each prompt is prefilled once into a prompt-cache slot shared by its n samples, every step decodes one
token for all live sequences, and a sequence that finishes is replaced by the next waiting prompt instead of
idling until the longest sequence of a static batch is done (`ssb.engine.scheduler`). Progress is shown and
logged in tokens (`ssb.engine.progress`); `Engine.last_stats` holds the last call's tokens/s and KV bytes.
Sampling (`ssb.engine.sampling`) draws from a seeded uniform stream per (prompt, sample), so results do not
depend on batch size or scheduling. Benchmarks and design notes: benchmarks/README.md, section "Generation".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import torch

from ssb.engine.cache import UnsupportedModelError, unwrap_causal_lm
from ssb.engine.fallback import hf_generate_all
from ssb.engine.sampling import SamplingParams, check_request
from ssb.engine.scheduler import Completion, Scheduler

__all__ = ["Completion", "Engine", "SamplingParams", "stop_token_ids", "tokenize_prompts"]


def stop_token_ids(tokenizer, model) -> set[int]:
    """tokenizer.eos_token_id, the generation_config eos ids, and the chat template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in ([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    if getattr(tokenizer, "chat_template", None):
        marker = "Zq7xMARKER"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
            )
        except Exception:  # templates that reject this conversation shape: rely on the eos ids
            text = ""
        if marker in text:
            after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            if after and after[0] in set(tokenizer.all_special_ids):
                ids.add(int(after[0]))
    return ids


def request_ids(tokenizer, prompts, n: int, params: SamplingParams, vocab: int) -> list[list[int]]:
    """What every generator does before it starts: check the request, tokenize the prompts, and check their ids
    lie in the vocabulary."""
    check_request(n, params)
    ids = tokenize_prompts(tokenizer, prompts)
    for i, p in enumerate(ids):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompts[{i}]: token id out of range [0, {vocab})")
    return ids


def tokenize_prompts(tokenizer, prompts) -> list[list[int]]:
    """Chat message lists are rendered with the chat template (generation prompt added); id lists pass through."""
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompts[{i}]: expected a non-empty list of chat messages or token ids, got {p!r:.80}")
        if all(isinstance(m, dict) for m in p):
            for j, m in enumerate(p):
                if "role" not in m or "content" not in m:
                    raise ValueError(f"prompts[{i}][{j}]: chat message needs 'role' and 'content' fields")
            text = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise ValueError(f"prompts[{i}]: mixes chat messages and token ids, or has items of another type")
    return out


def available_memory_bytes(device) -> int:
    """Memory free for new allocations now: the GPU's free memory, or the OS's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other Unixes: free physical pages (an underestimate where the OS caches files)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_kv_budget_bytes(device) -> int:
    """A quarter of the available memory: room for the weights, activations, the rest of the stage and the
    other programs on the machine."""
    return available_memory_bytes(device) // 4


@contextmanager
def _inference_state(lm):
    """eval mode (no dropout, incl. LoRA dropout) and no autograd; each module's training flag is restored."""
    modes = [(m, m.training) for m in lm.modules()]
    try:
        lm.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class Engine:
    """Continuous-batching generator over static KV caches; see the module docstring.

    model: a Hugging Face causal LM of a supported type (llama, mistral, qwen2, qwen3), or a peft model wrapping
    one, in any dtype (bf16 weights pay off on CPUs with fast bf16 matmuls; see ssb.engine.cache on precision).
    batch_size: most sequences decoded at once (fewer when the KV budget cannot hold that many at
    max_new_tokens). device: move the model there first (default: leave it where it is). progress: show a tqdm
    bar over tokens. kv_budget_mib: most KV-cache memory generation may allocate (None: a quarter of the memory
    available now, `default_kv_budget_bytes`). log: called with a progress line every minute (e.g. a stage's
    `say`). kv_dtype: the KV caches' dtype (None: the model's, ssb.engine.cache "Precision").
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 64,
        device=None,
        progress: bool = True,
        kv_budget_mib: float | None = None,
        log: Callable[[str], None] | None = None,
        kv_dtype: torch.dtype | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if kv_budget_mib is not None and kv_budget_mib <= 0:
            raise ValueError(f"kv_budget_mib must be > 0, got {kv_budget_mib}")
        try:
            self.lm, self.fallback = unwrap_causal_lm(model), False
        except UnsupportedModelError as e:  # another architecture: Hugging Face generate, slower but right
            self.lm, self.fallback = e.model, True
            print(f"[generate] {e}: using Hugging Face generate, one batch at a time (slower)", flush=True)
        if device is not None and torch.device(device) != next(model.parameters()).device:
            model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.device = next(model.parameters()).device
        # recorded in every artifact: which code and precision produced the text
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.backend = f"hf-generate/{dtype}" if self.fallback else f"torch-paged-kv/{dtype}"
        self.kv_budget_bytes = (
            int(kv_budget_mib * 2**20) if kv_budget_mib is not None else default_kv_budget_bytes(self.device)
        )
        self.log, self.kv_dtype = log, kv_dtype
        self.last_stats: dict = {}
        self.stop_ids = stop_token_ids(tokenizer, self.lm)
        if not self.stop_ids:
            raise ValueError("tokenizer and model define no eos token: generation could never stop early")

    def generate(
        self, prompts, n: int, params: SamplingParams, callback: Callable[[int, list[Completion]], None] | None = None
    ) -> list[list[Completion]]:
        """n completions per prompt, in order; `callback(i, completions)` fires when prompt i's n are done."""
        ids = request_ids(self.tokenizer, prompts, n, params, self.lm.get_input_embeddings().num_embeddings)
        results: list[list[Completion]] = [[] for _ in ids]
        if not ids:
            return results
        # greedy samples are identical: decode one per prompt and replicate it
        n_run = 1 if params.temperature == 0 else n

        def done(i: int, comps: list[Completion]) -> None:
            if n_run < n:  # distinct objects, so callers may edit one sample without touching the others
                comps = [replace(comps[0], token_ids=list(comps[0].token_ids)) for _ in range(n)]
            results[i] = comps
            if callback is not None:
                callback(i, results[i])

        with _inference_state(self.lm):
            if self.fallback:
                progress = hf_generate_all(self, ids, n_run, params, done)
                memory = {"rows": self.batch_size, "rows_limited_by_budget": False}
            else:
                scheduler = Scheduler(self, ids, n_run, params, done)
                scheduler.loop()
                progress = scheduler.progress
                memory = {"rows": scheduler.max_rows, "rows_limited_by_budget": scheduler.rows_limited_by_budget}
                memory.update(scheduler.cache.kv_stats())
                memory["attention"] = "cpu-kernel" if scheduler.cache.kernel is not None else "torch"
        self.last_stats = {
            "tokens": progress.generated,
            "seconds": round(time.perf_counter() - progress.start, 3),
            "tok_per_s": round(progress.rate(), 1),
            "kv_budget_bytes": self.kv_budget_bytes,
            **memory,
        }
        return results

    def close(self) -> None:
        """Drop the engine's references to the model (its KV pools live only inside `generate`): nothing runs
        outside this process, so this only lets the weights go once the caller drops them too. Stages close
        every generator when done (`ssb.engine.vllm.VllmGenerator.close` stops processes)."""
        self.model = self.lm = None

    def summary(self) -> str:
        """The last call in one line: tokens, rate, and KV memory (for a stage's log)."""
        s = self.last_stats
        if not s:
            return "nothing generated"
        line = f"{s['tokens']} tokens in {s['seconds']:.0f} s ({s['tok_per_s']:.0f} tok/s)"
        if "kv_bytes_allocated" in s:
            line += (
                f", KV cache peak {s['kv_bytes_allocated'] / 2**20:.0f} MiB allocated for "
                f"{s['kv_bytes_used'] / 2**20:.0f} MiB in use"
            )
        if "attention" in s:
            line += f"; decode attention: {s['attention']}"
        if s["rows_limited_by_budget"]:
            line += f"; {s['rows']} sequences at once (the KV budget, {s['kv_budget_bytes'] / 2**20:.0f} MiB)"
        return line
