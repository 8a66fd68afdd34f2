"""Batched text generation for every SSB stage that samples from a model (rollouts, teacher solutions, eval).

`Engine.generate(prompts, n, params)` returns n completions per prompt. It runs continuous batching over
preallocated KV caches (`ssb.engine.cache.SlotModel`): each prompt is prefilled once into a prompt-cache slot
shared by its n samples, every step decodes one token for all live sequences, and a sequence that finishes is
replaced by the next waiting prompt instead of idling until the longest sequence of a static batch is done.
Sampling (`ssb.engine.sampling`) draws from a seeded uniform stream per (prompt, sample), so results do not
depend on batch size or scheduling. Benchmarks and design notes: benchmarks/README.md, section "Generation".
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from ssb.engine.cache import SlotModel, unwrap_causal_lm
from ssb.engine.sampling import check_sampling, sample_next, sequence_uniforms

# Upper bound on (prompts x padded length) per prefill call, to bound activation memory.
_PREFILL_TOKENS = 16384


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class Completion:
    text: str  # decoded generated text, special tokens (end-of-turn) stripped
    token_ids: list[int]  # generated ids, including the final stop token if one was produced
    num_tokens: int  # len(token_ids)
    finish_reason: str  # "stop" (EOS / end-of-turn) or "length"


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
    one, in any dtype (bf16 weights pay off on CPUs with AMX units; attention stays fp32 on CPU, see
    ssb.engine.cache). batch_size: most sequences decoded at once (KV memory is about
    1.25 x batch_size x (longest prompt + max_new_tokens) positions). device: move the model there first
    (default: leave it where it is). progress: show a tqdm bar over prompts.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 64, device=None, progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lm = unwrap_causal_lm(model)
        if device is not None and torch.device(device) != next(model.parameters()).device:
            model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress
        self.device = next(model.parameters()).device
        # recorded in every artifact: which code and precision produced the text
        self.backend = f"torch-static-kv/{str(next(model.parameters()).dtype).removeprefix('torch.')}"
        self.stop_ids = stop_token_ids(tokenizer, self.lm)
        if not self.stop_ids:
            raise ValueError("tokenizer and model define no eos token: generation could never stop early")

    def generate(
        self, prompts, n: int, params: SamplingParams, callback: Callable[[int, list[Completion]], None] | None = None
    ) -> list[list[Completion]]:
        """n completions per prompt, in order; `callback(i, completions)` fires when prompt i's n are done."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        check_sampling(params.temperature, params.top_k, params.top_p)
        ids = tokenize_prompts(self.tokenizer, prompts)
        vocab = self.lm.get_input_embeddings().num_embeddings
        for i, p in enumerate(ids):
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompts[{i}]: token id out of range [0, {vocab})")
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
            _Run(self, ids, n_run, params, done).loop()
        return results


class _Run:
    """State of one generate() call: row bookkeeping, admission (prefill) and the decode loop.

    Rows are generation-cache rows (one per sequence in flight); prompt slots are prompt-cache slots (one per
    prompt in flight, shared by the rows sampling from it). New rows are appended after the live ones, so the
    live region [lo, hi) is in age order (generated lengths non-increasing), which lets decode attention pad
    per chunk of similar lengths. Finished rows leave holes that the region's head skips; when holes pile up or
    the region reaches the end of the cache, live rows are compacted to the front, keeping their order.
    """

    def __init__(self, engine: Engine, ids: list[list[int]], n: int, params: SamplingParams, done):
        self.e, self.ids, self.n, self.p, self.done = engine, ids, n, params, done
        self.batch = min(engine.batch_size, len(ids) * n)  # most rows decoded at once
        cap = self.batch + self.batch // 4  # slack: appending continues past holes before a compaction
        n_slots = min(self.batch, len(ids) * -(-n // self.batch))  # a prompt with n > batch takes several
        self.sm = SlotModel(engine.model, cap, n_slots, max(map(len, ids)), params.max_new_tokens)
        self.pending = deque([i, 0] for i in range(len(ids)))  # [prompt, next sample index]
        self.partial: dict[int, list] = {}  # prompt -> completions collected so far (None = not finished)
        self.seq: list[tuple[int, int] | None] = [None] * cap  # row -> (prompt, sample)
        self.out: list[list[int]] = [[] for _ in range(cap)]  # row -> generated ids
        self.slot_of = [0] * cap  # row -> prompt slot
        self.lo = self.hi = self.live = 0  # live rows lie in [lo, hi)
        self.members: list[list[int] | None] = [None] * n_slots  # prompt slot -> its live rows
        self.slot_len = [0] * n_slots  # prompt slot -> prompt length
        self.uniforms = torch.zeros(cap, params.max_new_tokens, dtype=torch.float64)
        self.generated = 0

    def loop(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.ids), desc="generate", unit="prompt", disable=not self.e.progress)
        self.bar, start = bar, time.perf_counter()
        threads = _ThreadTuner() if self.sm.device.type == "cpu" and torch.get_num_threads() > 1 else None
        try:
            while self.pending or self.live:
                self.admit()
                if not self.pending:
                    self.compact_slots()
                if self.live:
                    t, rows = time.perf_counter(), self.hi - self.lo
                    if threads:
                        threads.before_step()
                    self.step()
                    if threads:
                        threads.after_step((time.perf_counter() - t) / rows)
                    if self.hi - self.lo - self.live > max(2, self.live // 8):
                        self.compact_rows()
                    bar.set_postfix(tok_s=f"{self.generated / (time.perf_counter() - start):.0f}", refresh=False)
        finally:
            if threads:
                threads.restore()
            bar.close()

    def admit(self) -> None:
        """Prefill waiting prompts into free rows: all remaining samples of a prompt at once, so the prompt is
        prefilled once (a prompt with more samples than the batch is split once half the batch is free)."""
        free = self.batch - self.live
        free_slots = [j for j, m in enumerate(self.members) if m is None]
        plan = []  # (prompt, first sample, samples, prompt slot)
        while self.pending and free_slots:
            i, j = self.pending[0]
            want = self.n - j
            take = want if free >= want else (free if free >= max(1, self.batch // 2) else 0)
            t = max(len(self.ids[q]) for q in [i] + [x[0] for x in plan])
            if take == 0 or (plan and t * (len(plan) + 1) > _PREFILL_TOKENS):
                break
            if take == want:
                self.pending.popleft()
            else:
                self.pending[0][1] += take
            plan.append((i, j, take, free_slots.pop(0)))
            free -= take
        if not plan:
            return
        total = sum(x[2] for x in plan)
        if self.hi + total > len(self.seq):
            self.compact_rows()
        logits = self.sm.prefill([self.ids[i] for i, *_ in plan], [x[3] for x in plan])  # [P, V]
        rows, which = [], []
        for k, (i, j, take, slot) in enumerate(plan):
            self.members[slot], self.slot_len[slot] = list(range(self.hi, self.hi + take)), len(self.ids[i])
            for s in range(j, j + take):
                b = self.hi
                self.hi += 1
                self.seq[b], self.out[b], self.slot_of[b] = (i, s), [], slot
                if self.p.temperature > 0:
                    self.uniforms[b] = sequence_uniforms(self.p.seed, self.ids[i], s, self.p.max_new_tokens)
                rows.append(b)
                which.append(k)
        if self.live == 0:
            self.lo = rows[0]
        self.live += total
        self.emit(rows, logits[torch.tensor(which, device=logits.device)])

    def compact_rows(self) -> None:
        """Move the live rows to [0, live), keeping their (age) order; their generated KV moves with them."""
        src = [b for b in range(self.lo, self.hi) if self.seq[b] is not None]
        moved = [(b, d) for d, b in enumerate(src) if b != d]
        if moved:
            self.sm.move_rows([b for b, _ in moved], [d for _, d in moved], max(len(self.out[b]) for b in src))
            self.uniforms[[d for _, d in moved]] = self.uniforms[[b for b, _ in moved]]
            for b, d in moved:  # ascending, d < b: a source is never overwritten before it is read
                self.seq[d], self.out[d], self.slot_of[d] = self.seq[b], self.out[b], self.slot_of[b]
                self.seq[b] = None
                m = self.members[self.slot_of[d]]
                m[m.index(b)] = d
        self.lo, self.hi = 0, len(src)

    def compact_slots(self) -> None:
        """Move live prompt slots to the lowest indices (prompt KV copied with them)."""
        used = [j for j, m in enumerate(self.members) if m is not None]
        movers = [j for j in used if j >= len(used)]
        if movers:
            holes = [j for j in range(len(used)) if self.members[j] is None]
            self.sm.move_prompts(movers, holes)
            for src, dst in zip(movers, holes):
                self.members[dst], self.members[src] = self.members[src], None
                self.slot_len[dst] = self.slot_len[src]
                for b in self.members[dst]:
                    self.slot_of[b] = dst

    def step(self) -> None:
        dev, lo, r = self.sm.device, self.lo, self.hi - self.lo
        used = max(j for j, m in enumerate(self.members) if m is not None) + 1
        width = max(len(m) for m in self.members[:used] if m is not None)
        members = torch.full((used, width), r, dtype=torch.long)
        member_of = [0] * r
        for j, m in enumerate(self.members[:used]):
            for k, b in enumerate(m or ()):
                members[j, k] = b - lo
                member_of[b - lo] = j * width + k
        prompt_lens = [self.slot_len[j] if m else 0 for j, m in enumerate(self.members[:used])]
        seqs, outs = self.seq[lo : self.hi], self.out[lo : self.hi]
        step = [len(o) - 1 if s else -1 for s, o in zip(seqs, outs)]
        logits = self.sm.decode(
            lo,
            torch.tensor([o[-1] if s else 0 for s, o in zip(seqs, outs)], device=dev),
            torch.tensor([max(st, 0) for st in step], device=dev),
            torch.tensor([len(self.ids[s[0]]) if s else 0 for s in seqs], device=dev),
            members.to(dev),
            torch.tensor(member_of, device=dev),
            torch.tensor(prompt_lens, device=dev),
            _chunks(step),
        )
        live = [k for k, s in enumerate(seqs) if s is not None]
        self.emit([lo + k for k in live], logits[torch.tensor(live, device=dev)] if len(live) < r else logits)

    def emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each row in `rows` (logits: [len(rows), V]) and retire finished sequences."""
        steps = [len(self.out[b]) for b in rows]
        u = self.uniforms[rows, steps]  # [len(rows)]
        p = self.p
        new = sample_next(logits, u, p.temperature, p.top_k, p.top_p).tolist()
        self.generated += len(new)
        for b, tok in zip(rows, new):
            out = self.out[b]
            out.append(tok)
            stop = tok in self.e.stop_ids
            if stop or len(out) >= p.max_new_tokens:
                self.finish(b, "stop" if stop else "length")

    def finish(self, b: int, reason: str) -> None:
        i, s = self.seq[b]
        ids = self.out[b]
        text_ids = ids[:-1] if reason == "stop" else ids
        text = self.e.tokenizer.decode(text_ids, skip_special_tokens=True)
        comps = self.partial.setdefault(i, [None] * self.n)
        comps[s] = Completion(text=text, token_ids=list(ids), num_tokens=len(ids), finish_reason=reason)
        self.seq[b] = None
        self.live -= 1
        while self.lo < self.hi and self.seq[self.lo] is None:
            self.lo += 1
        if self.live == 0:
            self.lo = self.hi = 0
        slot = self.slot_of[b]
        self.members[slot].remove(b)
        if not self.members[slot]:
            self.members[slot] = None
        if all(c is not None for c in comps):
            del self.partial[i]
            self.bar.update(1)
            self.done(i, comps)


class _ThreadTuner:
    """Chooses torch's CPU thread count for decoding from measured step times.

    On a CPU shared with other busy processes a multi-thread OpenMP pool can be many times slower than one
    thread (every parallel region waits for a descheduled worker; measured here: 2 threads 15.7 tok/s vs about
    100 with 1 thread while another process used one of the 2 cores), while on a quiet machine more threads win.
    So every `period` steps the candidates (the caller's setting and 1) are timed alternately for `trial`
    steps each and the faster one (median seconds per row) is used until the next trial.
    """

    def __init__(self, period: int = 64, trial: int = 3):
        self.original = torch.get_num_threads()
        self.candidates = [self.original, 1]
        self.period, self.trial = period, trial
        self.best, self.count, self.current = self.original, 0, self.original
        self.times: dict[int, list[float]] = {c: [] for c in self.candidates}

    def _trial_steps(self) -> int:
        return self.trial * len(self.candidates)

    def before_step(self) -> None:
        phase = self.count % self.period
        want = self.candidates[phase % len(self.candidates)] if phase < self._trial_steps() else self.best
        if want != self.current:
            torch.set_num_threads(want)
            self.current = want

    def after_step(self, seconds_per_row: float) -> None:
        phase = self.count % self.period
        self.count += 1
        if phase < self._trial_steps():
            self.times[self.current].append(seconds_per_row)
            if phase == self._trial_steps() - 1:
                self.best = min(self.candidates, key=lambda c: sorted(self.times[c])[len(self.times[c]) // 2])
                self.times = {c: [] for c in self.candidates}

    def restore(self) -> None:
        torch.set_num_threads(self.original)


def _chunks(step: list[int], slack: float = 0.125, min_rows: int = 4) -> list[tuple[int, int, int]]:
    """Split rows into (first, end, length) ranges for the generated-token attention. `step` is each row's
    generated length so far, non-increasing along the rows, -1 for a hole. A row starts a new chunk when
    padding it to the current chunk's length would waste more than `slack` of that length."""
    chunks: list[list[int]] = []
    for k, st in enumerate(step):
        need = st + 1
        if chunks and (st < 0 or k - chunks[-1][0] < min_rows or need >= (1 - slack) * chunks[-1][2]):
            chunks[-1][1], chunks[-1][2] = k + 1, max(chunks[-1][2], need)
        else:
            chunks.append([k, k + 1, max(need, 1)])
    return [tuple(c) for c in chunks]
