"""The continuous-batching scheduler behind `Engine.generate`: cache rows and prompt slots, admission (prefill),
compaction and the decode loop; plus the CPU thread-count tuner and the decode-attention chunking it uses."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from ssb.engine.cache import SlotModel
from ssb.engine.sampling import SamplingParams, sample_next, sequence_uniforms

# Upper bound on (prompts x padded length) per prefill call, to bound activation memory.
_PREFILL_TOKENS = 16384


@dataclass
class Completion:
    text: str  # decoded generated text, special tokens (end-of-turn) stripped
    token_ids: list[int]  # generated ids, including the final stop token if one was produced
    num_tokens: int  # len(token_ids)
    finish_reason: str  # "stop" (EOS / end-of-turn) or "length"


class Scheduler:
    """One generate() call: which sequences occupy which cache rows, admission (prefill) and the decode loop.

    Rows are generation-cache rows (one per sequence in flight); prompt slots are prompt-cache slots (one per
    prompt in flight, shared by the rows sampling from it). New rows are appended after the live ones, so the
    live region [live_start, live_end) is in age order (generated lengths non-increasing), which lets decode
    attention pad per chunk of similar lengths. Finished rows leave holes that the region's head skips; when
    holes pile up or the region reaches the end of the cache, live rows are compacted to the front, in order.
    """

    def __init__(self, engine, prompts: list[list[int]], samples: int, params: SamplingParams, on_done):
        self.engine, self.prompts, self.samples, self.params, self.on_done = engine, prompts, samples, params, on_done
        self.max_rows = min(engine.batch_size, len(prompts) * samples)  # most rows decoded at once
        rows = self.max_rows + self.max_rows // 4  # slack: appending continues past holes before a compaction
        # a prompt with more samples than max_rows takes several slots
        slots = min(self.max_rows, len(prompts) * -(-samples // self.max_rows))
        self.cache = SlotModel(engine.model, rows, slots, max(map(len, prompts)), params.max_new_tokens)
        self.waiting = deque([i, 0] for i in range(len(prompts)))  # [prompt, next sample index]
        self.collected: dict[int, list] = {}  # prompt -> its completions so far (None = not finished)
        self.row_seq: list[tuple[int, int] | None] = [None] * rows  # row -> (prompt, sample), None = free
        self.row_tokens: list[list[int]] = [[] for _ in range(rows)]  # row -> generated ids
        self.row_slot = [0] * rows  # row -> prompt slot
        self.live_start = self.live_end = self.live_count = 0
        self.slot_rows: list[list[int] | None] = [None] * slots  # prompt slot -> its live rows, None = free
        self.slot_prompt_len = [0] * slots
        self.uniforms = torch.zeros(rows, params.max_new_tokens, dtype=torch.float64)  # per-row sampling stream
        self.generated = 0

    def loop(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.prompts), desc="generate", unit="prompt", disable=not self.engine.progress)
        start = time.perf_counter()
        threads = ThreadTuner() if self.cache.device.type == "cpu" and torch.get_num_threads() > 1 else None
        try:
            while self.waiting or self.live_count:
                self.admit()
                if not self.waiting:
                    self.compact_slots()
                if self.live_count:
                    t, rows = time.perf_counter(), self.live_end - self.live_start
                    if threads:
                        threads.before_step()
                    self.decode_step()
                    if threads:
                        threads.after_step((time.perf_counter() - t) / rows)
                    holes = self.live_end - self.live_start - self.live_count
                    if holes > max(2, self.live_count // 8):
                        self.compact_rows()
                    rate = self.generated / (time.perf_counter() - start)
                    self.bar.set_postfix(tok_s=f"{rate:.0f}", refresh=False)
        finally:
            if threads:
                threads.restore()
            self.bar.close()

    # ------------------------------------------------------------------------------------------ admission

    def plan_admission(self) -> list[tuple[int, int, int, int]]:
        """Which waiting prompts to prefill now, as (prompt, first sample, samples, prompt slot): all remaining
        samples of a prompt at once, so the prompt is prefilled once (a prompt with more samples than max_rows
        is split once half the rows are free), within the prefill token bound."""
        free_rows = self.max_rows - self.live_count
        free_slots = [j for j, rows in enumerate(self.slot_rows) if rows is None]
        plan = []
        while self.waiting and free_slots:
            prompt, first = self.waiting[0]
            want = self.samples - first
            if free_rows >= want:
                take = want
            else:
                take = free_rows if free_rows >= max(1, self.max_rows // 2) else 0
            longest = max(len(self.prompts[q]) for q in [prompt] + [x[0] for x in plan])
            if take == 0 or (plan and longest * (len(plan) + 1) > _PREFILL_TOKENS):
                break
            if take == want:
                self.waiting.popleft()
            else:
                self.waiting[0][1] += take
            plan.append((prompt, first, take, free_slots.pop(0)))
            free_rows -= take
        return plan

    def admit(self) -> None:
        """Prefill the planned prompts into their slots, give each sample a row, and sample its first token."""
        plan = self.plan_admission()
        if not plan:
            return
        total = sum(take for _, _, take, _ in plan)
        if self.live_end + total > len(self.row_seq):
            self.compact_rows()
        logits = self.cache.prefill([self.prompts[p] for p, *_ in plan], [slot for *_, slot in plan])  # [P, V]
        rows, plan_index = [], []
        for k, (prompt, first, take, slot) in enumerate(plan):
            self.slot_rows[slot] = list(range(self.live_end, self.live_end + take))
            self.slot_prompt_len[slot] = len(self.prompts[prompt])
            for sample in range(first, first + take):
                row = self.live_end
                self.live_end += 1
                self.row_seq[row], self.row_tokens[row], self.row_slot[row] = (prompt, sample), [], slot
                if self.params.temperature > 0:
                    self.uniforms[row] = sequence_uniforms(
                        self.params.seed, self.prompts[prompt], sample, self.params.max_new_tokens
                    )
                rows.append(row)
                plan_index.append(k)
        if self.live_count == 0:
            self.live_start = rows[0]
        self.live_count += total
        self.emit(rows, logits[torch.tensor(plan_index, device=logits.device)])

    # ------------------------------------------------------------------------------------------ compaction

    def compact_rows(self) -> None:
        """Move the live rows to [0, live_count), keeping their (age) order; their generated KV moves along."""
        live = [r for r in range(self.live_start, self.live_end) if self.row_seq[r] is not None]
        moved = [(src, dst) for dst, src in enumerate(live) if src != dst]
        if moved:
            longest = max(len(self.row_tokens[r]) for r in live)
            self.cache.move_rows([src for src, _ in moved], [dst for _, dst in moved], longest)
            self.uniforms[[dst for _, dst in moved]] = self.uniforms[[src for src, _ in moved]]
            for src, dst in moved:  # ascending, dst < src: a source is never overwritten before it is read
                self.row_seq[dst], self.row_tokens[dst] = self.row_seq[src], self.row_tokens[src]
                self.row_slot[dst] = self.row_slot[src]
                self.row_seq[src] = None
                siblings = self.slot_rows[self.row_slot[dst]]
                siblings[siblings.index(src)] = dst
        self.live_start, self.live_end = 0, len(live)

    def compact_slots(self) -> None:
        """Move live prompt slots to the lowest indices (prompt KV copied with them)."""
        used = [j for j, rows in enumerate(self.slot_rows) if rows is not None]
        movers = [j for j in used if j >= len(used)]
        if movers:
            holes = [j for j in range(len(used)) if self.slot_rows[j] is None]
            self.cache.move_prompts(movers, holes)
            for src, dst in zip(movers, holes):
                self.slot_rows[dst], self.slot_rows[src] = self.slot_rows[src], None
                self.slot_prompt_len[dst] = self.slot_prompt_len[src]
                for row in self.slot_rows[dst]:
                    self.row_slot[row] = dst

    # ------------------------------------------------------------------------------------------ decoding

    def slot_membership(self) -> tuple[torch.Tensor, list[int], list[int]]:
        """For decode attention over the shared prompt KV: slot_rows as a padded [slots, width] tensor of
        row offsets (padding = the live region's length), each row's flat index into it, and each slot's
        prompt length (0 for a free slot)."""
        start, span = self.live_start, self.live_end - self.live_start
        used = max(j for j, rows in enumerate(self.slot_rows) if rows is not None) + 1
        width = max(len(rows) for rows in self.slot_rows[:used] if rows is not None)
        members = torch.full((used, width), span, dtype=torch.long)
        member_index = [0] * span
        for j, rows in enumerate(self.slot_rows[:used]):
            for k, row in enumerate(rows or ()):
                members[j, k] = row - start
                member_index[row - start] = j * width + k
        prompt_lens = [self.slot_prompt_len[j] if rows else 0 for j, rows in enumerate(self.slot_rows[:used])]
        return members, member_index, prompt_lens

    def decode_step(self) -> None:
        """One token for every live row: decode the live region (holes included) and sample the live rows."""
        dev, start, end = self.cache.device, self.live_start, self.live_end
        members, member_index, prompt_lens = self.slot_membership()
        seqs, tokens = self.row_seq[start:end], self.row_tokens[start:end]
        generated = [len(t) - 1 if s else -1 for s, t in zip(seqs, tokens)]  # -1: a hole
        logits = self.cache.decode(
            start,
            torch.tensor([t[-1] if s else 0 for s, t in zip(seqs, tokens)], device=dev),
            torch.tensor([max(g, 0) for g in generated], device=dev),
            torch.tensor([len(self.prompts[s[0]]) if s else 0 for s in seqs], device=dev),
            members.to(dev),
            torch.tensor(member_index, device=dev),
            torch.tensor(prompt_lens, device=dev),
            _chunks(generated),
        )
        live = [k for k, s in enumerate(seqs) if s is not None]
        live_logits = logits[torch.tensor(live, device=dev)] if len(live) < end - start else logits
        self.emit([start + k for k in live], live_logits)

    def emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each row in `rows` (logits: [len(rows), V]) and retire finished sequences."""
        steps = [len(self.row_tokens[r]) for r in rows]
        u = self.uniforms[rows, steps]  # [len(rows)]
        params = self.params
        new = sample_next(logits, u, params.temperature, params.top_k, params.top_p).tolist()
        self.generated += len(new)
        for row, token in zip(rows, new):
            tokens = self.row_tokens[row]
            tokens.append(token)
            stop = token in self.engine.stop_ids
            if stop or len(tokens) >= params.max_new_tokens:
                self.finish(row, "stop" if stop else "length")

    def finish(self, row: int, reason: str) -> None:
        """Retire a finished sequence: free its row (and its slot when it was the prompt's last), and hand the
        prompt's completions over once all its samples are done."""
        prompt, sample = self.row_seq[row]
        ids = self.row_tokens[row]
        text = self.engine.tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
        comps = self.collected.setdefault(prompt, [None] * self.samples)
        comps[sample] = Completion(text=text, token_ids=list(ids), num_tokens=len(ids), finish_reason=reason)
        self.row_seq[row] = None
        self.live_count -= 1
        while self.live_start < self.live_end and self.row_seq[self.live_start] is None:
            self.live_start += 1
        if self.live_count == 0:
            self.live_start = self.live_end = 0
        slot = self.row_slot[row]
        self.slot_rows[slot].remove(row)
        if not self.slot_rows[slot]:
            self.slot_rows[slot] = None
        if all(c is not None for c in comps):
            del self.collected[prompt]
            self.bar.update(1)
            self.on_done(prompt, comps)


class ThreadTuner:
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
