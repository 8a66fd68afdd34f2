"""The continuous-batching scheduler behind `Engine.generate`: rows and prompt slots, admission under the KV
memory budget (prefill), and the decode loop; plus the CPU thread-count tuner."""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass

import torch

from ssb.engine.cache import SlotModel
from ssb.engine.progress import TokenProgress
from ssb.engine.sampling import SamplingParams, sample_next, sequence_uniforms

# Upper bound on (prompts x padded length) per prefill call, to bound activation memory.
_PREFILL_TOKENS = 16384


class MemoryBudgetError(ValueError):
    """The generation memory budget cannot hold even one sequence."""


@dataclass
class Completion:
    text: str  # decoded generated text, special tokens (end-of-turn) stripped
    token_ids: list[int]  # generated ids, including the final stop token if one was produced
    num_tokens: int  # len(token_ids)
    finish_reason: str  # "stop" (EOS / end-of-turn) or "length"


class Scheduler:
    """One generate() call: which sequences occupy which rows and prompt slots, admission (prefill) and the decode
    loop.

    A row is a sequence in flight (its generated tokens, sampling stream and segment slots in the paged cache);
    a prompt slot is a prompt in flight, shared by the rows sampling from it. At most `max_rows` rows run at
    once: the engine's batch size, lowered so that every row could reach max_new_tokens within the KV budget
    (see ssb.engine.cache). The KV of a running sequence never moves; only prompt slots are compacted (so the
    prompt attention spans few free slots) once nothing waits.
    """

    def __init__(self, engine, prompts: list[list[int]], samples: int, params: SamplingParams, on_done):
        self.engine, self.prompts, self.samples, self.params, self.on_done = engine, prompts, samples, params, on_done
        self.cache = SlotModel(engine.model, max(map(len, prompts)), params.max_new_tokens, engine.kv_dtype)
        per_sequence = self.cache.worst_case_bytes_per_sequence()
        budget = engine.kv_budget_bytes
        if per_sequence > budget:
            raise MemoryBudgetError(
                f"the generation memory budget ({budget / 2**20:.1f} MiB, config key generation_memory_mib) is "
                f"smaller than one sequence's KV cache: {per_sequence / 2**20:.1f} MiB for a "
                f"{max(map(len, prompts))}-token prompt + {params.max_new_tokens} new tokens; raise the budget "
                "or lower max_new_tokens"
            )
        wanted = min(engine.batch_size, len(prompts) * samples)
        self.max_rows = min(wanted, budget // per_sequence)  # most rows decoded at once
        self.rows_limited_by_budget = self.max_rows < wanted
        # a prompt with more samples than max_rows takes several slots
        slots = min(self.max_rows, len(prompts) * -(-samples // self.max_rows))
        self.cache.set_limits(self.max_rows, slots)
        self.waiting = deque([i, 0] for i in range(len(prompts)))  # [prompt, next sample index]
        self.collected: dict[int, list] = {}  # prompt -> its completions so far (None = not finished)
        self.free_rows = list(range(self.max_rows))  # a heap: the lowest free row is reused first
        self.live: list[int] = []  # running rows, oldest first
        self.row_seq: list[tuple[int, int] | None] = [None] * self.max_rows  # row -> (prompt, sample)
        self.row_tokens: list[list[int]] = [[] for _ in range(self.max_rows)]  # row -> generated ids
        self.row_slot = [0] * self.max_rows  # row -> prompt slot
        self.slot_rows: list[list[int] | None] = [None] * slots  # prompt slot -> its live rows, None = free
        self.slot_prompt_len = [0] * slots
        self.uniforms = torch.zeros(self.max_rows, params.max_new_tokens, dtype=torch.float64)  # sampling streams
        self.generated = 0

    def loop(self) -> None:
        sequences = len(self.prompts) * self.samples
        self.progress = TokenProgress(
            len(self.prompts), sequences, self.params.max_new_tokens, self.engine.progress, log=self.engine.log
        )
        threads = ThreadTuner() if self.cache.device.type == "cpu" and torch.get_num_threads() > 1 else None
        try:
            while self.waiting or self.live:
                before = self.generated
                self.admit()
                if not self.waiting:
                    self.compact_slots()
                if self.live:
                    t, rows = time.perf_counter(), len(self.live)
                    if threads:
                        threads.before_step()
                    self.decode_step()
                    if threads:
                        threads.after_step((time.perf_counter() - t) / rows)
                waiting = sum(self.samples - first for _, first in self.waiting)
                running = [len(self.row_tokens[r]) for r in self.live]
                self.progress.step(self.generated - before, running, waiting)
        finally:
            if threads:
                threads.restore()
            self.progress.close()

    # ------------------------------------------------------------------------------------------ admission

    def plan_admission(self) -> list[tuple[int, int, int, int]]:
        """Which waiting prompts to prefill now, as (prompt, first sample, samples, prompt slot): all remaining
        samples of a prompt at once, so the prompt is prefilled once (a prompt with more samples than max_rows
        is split once half the rows are free), within the prefill token bound."""
        free_rows = self.max_rows - len(self.live)
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
        logits = self.cache.prefill([self.prompts[p] for p, *_ in plan], [slot for *_, slot in plan])  # [P, V]
        rows, plan_index = [], []
        for k, (prompt, first, take, slot) in enumerate(plan):
            self.slot_rows[slot] = []
            self.slot_prompt_len[slot] = len(self.prompts[prompt])
            for sample in range(first, first + take):
                row = heapq.heappop(self.free_rows)
                self.live.append(row)
                self.slot_rows[slot].append(row)
                self.row_seq[row], self.row_tokens[row], self.row_slot[row] = (prompt, sample), [], slot
                if self.params.temperature > 0:
                    self.uniforms[row] = sequence_uniforms(
                        self.params.seed, self.prompts[prompt], sample, self.params.max_new_tokens
                    )
                rows.append(row)
                plan_index.append(k)
        self.emit(rows, logits[torch.tensor(plan_index, device=logits.device)])

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

    def slot_membership(self, rows: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
        """For decode attention over the shared prompt KV: slot_rows as a padded [slots, width] tensor of indices
        into `rows` (padding = len(rows)), each row's flat index into it, and each slot's prompt length (0 for a
        free slot)."""
        index_of = {row: k for k, row in enumerate(rows)}
        used = max(j for j, members in enumerate(self.slot_rows) if members) + 1
        width = max(len(members) for members in self.slot_rows[:used] if members)
        members_t = torch.full((used, width), len(rows), dtype=torch.long)
        member_index = [0] * len(rows)
        for j, members in enumerate(self.slot_rows[:used]):
            for k, row in enumerate(members or ()):
                members_t[j, k] = index_of[row]
                member_index[index_of[row]] = j * width + k
        prompt_lens = [self.slot_prompt_len[j] if members else 0 for j, members in enumerate(self.slot_rows[:used])]
        return members_t, member_index, prompt_lens

    def decode_step(self) -> None:
        """One token for every running sequence."""
        dev, rows = self.cache.device, list(self.live)
        members, member_index, prompt_lens = self.slot_membership(rows)
        logits = self.cache.decode(
            rows,
            [self.row_tokens[r][-1] for r in rows],
            [len(self.row_tokens[r]) - 1 for r in rows],
            [self.slot_prompt_len[self.row_slot[r]] for r in rows],
            members.to(dev),
            torch.tensor(member_index, device=dev),
            torch.tensor(prompt_lens, device=dev),
        )
        self.emit(rows, logits)

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
        """Retire a finished sequence: free its row, its cache segments (and its prompt slot when it was the
        prompt's last), and hand the prompt's completions over once all its samples are done."""
        prompt, sample = self.row_seq[row]
        ids = self.row_tokens[row]
        text = self.engine.tokenizer.decode(ids[:-1] if reason == "stop" else ids, skip_special_tokens=True)
        comps = self.collected.setdefault(prompt, [None] * self.samples)
        comps[sample] = Completion(text=text, token_ids=list(ids), num_tokens=len(ids), finish_reason=reason)
        self.row_seq[row] = None
        self.live.remove(row)
        heapq.heappush(self.free_rows, row)
        self.cache.release(row)
        self.progress.sequence_done(len(ids))
        slot = self.row_slot[row]
        self.slot_rows[slot].remove(row)
        if not self.slot_rows[slot]:
            self.slot_rows[slot] = None
            self.cache.release_prompt(slot)
        if all(c is not None for c in comps):
            del self.collected[prompt]
            self.progress.prompt_done()
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
