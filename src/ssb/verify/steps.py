"""Reasoning quality beyond the final answer: check every written arithmetic step, and spot looping output.

`check_steps(text)` finds each written step `a op b (op c ...) = r` (integers or decimals, thousands commas
allowed; ops + - * / and their spellings x, ×, ÷, \\times, \\cdot, \\div; LaTeX \\( \\), \\[ \\] and $ wrappers
dropped) and evaluates the left side exactly (fractions, usual precedence). A step is right when the value equals
r exactly, or, when r is written with decimals, equals r after rounding to that many decimals (10 / 3 = 3.33).

Chains are read as the writer means them: in `3 + 4 = 7 + 2 = 9` the steps are `3 + 4 = 7` and `7 + 2 = 9`
(a number right after `=` may start the next step). An expression that continues a longer one the checker does
not parse (preceded by an operator or a bracket, e.g. `(2 + 3) x 4 = 20` or `-3 + 5 = 2`) is skipped, not judged.

`is_looping(text, finish_reason)` is the looping test used in eval summaries: the answer was cut at the token limit
(finish_reason == "length") and its end repeats itself: after dropping the last (cut-off) line, the last
`LOOP_LINES` non-empty lines hold at most `LOOP_LINES // 2` distinct lines, or the last `LOOP_CHARS` characters
are periodic with a period of at most `LOOP_CHARS // 2` (a loop without line breaks, e.g. "7 7 7 7").

    >>> [(s.text, s.ok) for s in check_steps("So 3 + 4 = 7 and 7 x 2 = 15.")]
    [('3 + 4 = 7', True), ('7 * 2 = 15', False)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

LOOP_LINES = 6  # the last lines looked at; a loop repeats a cycle of at most half of them at least twice
LOOP_CHARS = 240  # the tail looked at for a loop without line breaks

_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_OP = r"[-+*/]"
_STEP = re.compile(rf"(?=(?P<lhs>(?:{_NUM})(?:\s*{_OP}\s*(?:{_NUM}))+)\s*=\s*(?P<rhs>{_NUM}))")
_TERM = re.compile(rf"({_NUM})|({_OP})")
_SPELLINGS = [
    (re.compile(r"\\boxed\{([^{}]*)\}"), r"\1"),
    (re.compile(r"\\\(|\\\)|\\\[|\\\]|\$"), " "),  # math-mode wrappers
    (re.compile(r"\\times|\\cdot|×|·|∗"), "*"),
    (re.compile(r"\\div|÷"), "/"),
    (re.compile(r"[−–]"), "-"),  # unicode minus and en dash
    (re.compile(r"(?<=\d)\s*[xX]\s*(?=\d)"), " * "),  # 3 x 4
]


@dataclass(frozen=True)
class Step:
    text: str  # the step as normalised, e.g. "7 * 2 = 15"
    value: Fraction  # the left side, exactly
    claimed: Fraction  # the number written after "="
    ok: bool


def normalise(text: str) -> str:
    """The text with math wrappers dropped and every operator spelling mapped to + - * /."""
    for pattern, repl in _SPELLINGS:
        text = pattern.sub(repl, text)
    return text


def _number(s: str) -> Fraction:
    return Fraction(s.replace(",", ""))


def _evaluate(lhs: str) -> Fraction | None:
    """Exact value of `a op b op c ...` with * and / before + and -; None on division by zero."""
    terms = [m.group(0) for m in _TERM.finditer(lhs)]
    sums: list[Fraction] = []  # the additive terms, each with its sign applied
    sign, current, pending = 1, _number(terms[0]), None
    for t in terms[1:]:
        if t in "+-*/":
            pending = t
            continue
        x = _number(t)
        if pending == "*":
            current *= x
        elif pending == "/":
            if x == 0:
                return None
            current /= x
        else:
            sums.append(sign * current)
            sign, current = (1 if pending == "+" else -1), x
    sums.append(sign * current)
    return sum(sums, Fraction(0))


def _matches(value: Fraction, written: str) -> bool:
    claimed = _number(written)
    if value == claimed:
        return True
    decimals = len(written.split(".")[1]) if "." in written else 0
    if not decimals:
        return False
    scale = 10**decimals  # round half away from zero to the decimals written
    rounded = Fraction(int(abs(value) * scale + Fraction(1, 2)) * (1 if value >= 0 else -1), scale)
    return rounded == claimed


def _starts_an_expression(text: str, start: int) -> bool:
    """False when the match begins inside a number or continues a longer expression the checker does not parse."""
    if start and text[start - 1] in "0123456789.,":
        return False
    before = text[:start].rstrip()
    return not before or before[-1] not in "+-*/()^%"


def check_steps(text: str) -> list[Step]:
    """Every checkable arithmetic step in a solution, in order of appearance."""
    norm = normalise(text)
    steps = []
    for m in _STEP.finditer(norm):
        if not _starts_an_expression(norm, m.start()):
            continue
        lhs, rhs = m.group("lhs"), m.group("rhs")
        value = _evaluate(lhs)
        shown = " ".join(t.group(0) for t in _TERM.finditer(lhs)) + f" = {rhs}"
        if value is None:
            steps.append(Step(shown, Fraction(0), _number(rhs), False))
        else:
            steps.append(Step(shown, value, _number(rhs), _matches(value, rhs)))
    return steps


def has_wrong_step(text: str) -> bool:
    return any(not s.ok for s in check_steps(text))


def is_looping(text: str, finish_reason: str) -> bool:
    """Cut at the token limit while repeating itself (the module docstring gives the exact rule)."""
    if finish_reason != "length":
        return False
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines[:-1] if ln]  # the last line was cut mid-way
    tail = lines[-LOOP_LINES:]
    if len(tail) == LOOP_LINES and len(set(tail)) <= LOOP_LINES // 2:
        return True
    chars = text.rstrip()[-LOOP_CHARS:]
    if len(chars) < LOOP_CHARS:
        return False
    return any(chars[p:] == chars[:-p] for p in range(1, LOOP_CHARS // 2 + 1))


def step_stats(samples: list[dict]) -> dict:
    """Shares over eval samples (each with text, finish_reason and correct): with at least one checked step,
    with a wrong step, right final answer yet a wrong step, and looping; plus the step counts."""
    total = max(1, len(samples))
    checked = wrong = right_but_wrong_step = looping = n_steps = n_wrong = 0
    for s in samples:
        steps = check_steps(s["text"])
        bad = sum(not st.ok for st in steps)
        n_steps, n_wrong = n_steps + len(steps), n_wrong + bad
        checked += bool(steps)
        wrong += bool(bad)
        right_but_wrong_step += bool(bad) and bool(s["correct"])
        looping += is_looping(s["text"], s["finish_reason"])
    return {
        "step_checked_share": checked / total,
        "wrong_step_share": wrong / total,
        "correct_with_wrong_step_share": right_but_wrong_step / total,
        "looping_share": looping / total,
        "steps_checked": n_steps,
        "steps_wrong": n_wrong,
    }
