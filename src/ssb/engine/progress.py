"""Progress of a generate() call measured in tokens: the rate, and an ETA from the tokens still expected.

Under continuous batching prompts finish in bursts near the end, so an ETA from finished prompts is useless
(1/96 prompts done after 78 s read "2 hours" for a 12-minute stage). Here the remaining work is estimated in
tokens: each running sequence of length L is expected to run to the mean of the finished lengths longer than L
(the finished lengths so far, conditioned on having survived to L), each waiting sequence to the mean finished
length; before anything finished, or when no finished sequence was longer than L, the sequences are assumed to
run to max_new_tokens (an upper bound, so an early ETA errs long). ETA = expected remaining tokens / tokens per
second so far.
"""

from __future__ import annotations

import bisect
import time


def expected_remaining_tokens(finished: list[int], running: list[int], waiting: int, max_new: int) -> float:
    """Tokens still to generate. finished: lengths of the finished sequences, sorted ascending; running: the
    running sequences' current lengths; waiting: sequences not started."""
    total, prefix = 0.0, [0]
    for x in finished:
        prefix.append(prefix[-1] + x)
    for length in running:
        k = bisect.bisect_right(finished, length)  # finished[k:] are longer than `length`
        longer = len(finished) - k
        end = (prefix[-1] - prefix[k]) / longer if longer else max_new
        total += max(end - length, 1.0)
    mean = prefix[-1] / len(finished) if finished else max_new
    return total + waiting * mean


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class TokenProgress:
    """A tqdm bar over tokens (its total is re-estimated every step, so its percentage and ETA are in tokens)
    plus a plain log line every `log_every` seconds when the bar is off (the same numbers)."""

    def __init__(self, prompts: int, sequences: int, max_new: int, show: bool, log=None, log_every: float = 60.0):
        from tqdm.auto import tqdm

        self.prompts, self.sequences, self.max_new = prompts, sequences, max_new
        self.finished: list[int] = []
        self.prompts_done = 0
        self.generated = 0
        self.start = self.last_log = time.perf_counter()
        self.log, self.log_every = log, log_every
        self.bar = tqdm(
            total=sequences * max_new,
            desc="generate",
            unit="tok",
            disable=not show,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/~{total} tok "
            "[{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )

    def sequence_done(self, length: int) -> None:
        bisect.insort(self.finished, length)

    def prompt_done(self) -> None:
        self.prompts_done += 1

    def step(self, new_tokens: int, running: list[int], waiting: int) -> None:
        self.generated += new_tokens
        remaining = expected_remaining_tokens(self.finished, running, waiting, self.max_new)
        self.bar.total = max(int(self.generated + remaining), self.generated)
        self.bar.set_postfix_str(f"prompts {self.prompts_done}/{self.prompts}", refresh=False)
        self.bar.update(new_tokens)
        now = time.perf_counter()
        if self.log is not None and now - self.last_log >= self.log_every:
            self.last_log = now
            self.log(self.line(remaining))

    def rate(self) -> float:
        return self.generated / max(time.perf_counter() - self.start, 1e-9)

    def line(self, remaining: float | None = None) -> str:
        """One log line: tokens, rate, ETA (from tokens), prompts done."""
        rate = self.rate()
        text = f"{self.generated} tokens, {rate:.0f} tok/s"
        if remaining is not None:
            text += f", ETA {format_seconds(remaining / max(rate, 1e-9))} (~{remaining:.0f} tokens left)"
        return text + f", prompts {self.prompts_done}/{self.prompts}"

    def close(self) -> None:
        self.bar.close()
