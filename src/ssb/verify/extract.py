"""Answer extraction from completions, gold normalisation and the exact plain-number fast path.

Pure string work (regexes, `fractions.Fraction`): nothing here imports sympy. Every function takes time
linear in its input, or close to it (brace matching is one pass however deeply `\\boxed{` nests), and
`ssb.verify.verifier` runs it in the calling process only for texts up to `INLINE_CHARS` characters; longer
texts are extracted inside a worker process, under the item's deadline. `ssb.verify` re-exports the public
names.

Extraction policies (the name is recorded with every verdict):
  boxed    the last brace-matched `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`): the paper's rule.
  lenient  boxed first, then the last `#### N`, then the last "the (final) answer is ..." /
           "Final answer: ...", then the last number (or simple fraction) in the text. Small models
           rarely box their answers, so this is the default.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from itertools import accumulate

POLICIES = ("boxed", "lenient")
GOLD_FORMATS = ("gsm8k", "aime", "amc", "math", "plain", "auto")
# Texts up to this many characters are extracted in the calling process (microseconds); longer ones are extracted
# in a verification worker, under the item's deadline (ssb.verify.verifier).
INLINE_CHARS = 10_000


@dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str | None  # "boxed", "hash", "answer_is", "last_number" ("whole" from `extract_or_whole`)


# ---------------------------------------------------------------------------------------- numbers
# A plain number: optional sign, digits with optional thousands commas, optional decimals.
_PLAIN_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+"
_PLAIN_NUM_RE = re.compile(rf"^(?:{_PLAIN_NUM})$")
_FRAC_ARG = r"(?:\{\s*-?\d+\s*\}|\d)"
_LATEX_FRAC_RE = re.compile(rf"^(-?)\\[dt]?frac\s*({_FRAC_ARG})\s*({_FRAC_ARG})$")
_SLASH_FRAC_RE = re.compile(r"^(-?\d+)\s*/\s*(\d+)$")
_UNICODE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " "})


def _number_text(s: str) -> str:
    """Drops what only decorates a number: LaTeX spacing, `{,}` separators, currency prefixes."""
    s = s.translate(_UNICODE).strip()
    for junk in ("\\!", "\\,", "\\;", "\\ ", "{,}", "\\$", "$"):
        s = s.replace(junk, "," if junk == "{,}" else "")
    return s.replace(" ", "").lstrip("+")


def as_fraction(s: str) -> Fraction | None:
    """The exact value of a plain number / `a/b` / `\\frac{a}{b}` string, else None (not a number)."""
    s = _number_text(s)
    if not s or len(s) > 60:
        return None
    if _PLAIN_NUM_RE.match(s):
        return Fraction(s.replace(",", "").rstrip(".") or "0")
    m = _SLASH_FRAC_RE.match(s) or _LATEX_FRAC_RE.match(s)
    if m is None:
        return None
    parts = [g.strip("{} ") for g in m.groups()]
    if len(parts) == 3:  # \frac form: sign, numerator, denominator
        num, den = int(parts[1]) * (-1 if parts[0] else 1), int(parts[2])
    else:
        num, den = int(parts[0]), int(parts[1])
    return Fraction(num, den) if den != 0 else None


def _canonical_number(s: str) -> str:
    """`2,125` -> `2125`, `025` -> `25`, `27.0` -> `27`, `-0.50` -> `-0.5` (exactly, no floats)."""
    s = s.replace(",", "").lstrip("+")
    sign = "-" if s.startswith("-") else ""
    whole, _, frac = s.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = f"{whole}.{frac}" if frac else whole
    return "0" if out == "0" else sign + out


# ---------------------------------------------------------------------------------------- gold
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def normalize_gold(raw: str | int | float, fmt: str = "auto") -> str:
    """Canonical gold answer string for `is_equivalent` / `check`.

    gsm8k: the full GSM8K answer field; the number after the last `####` (`#### 2,125` -> `2125`).
    aime: zero padding dropped (`025` -> `25`). amc: floats made exact (`27.0` -> `27`).
    math: LaTeX with any `$...$` / `\\boxed{}` wrapper removed (the comparison re-wraps every answer
    in `\\boxed{}` before math-verify parses it, so `1,-2` is read as a set, never as `1`).
    plain: stripped text. auto: picks one of the above from the value. Raises ValueError (with no
    file/line; callers add them) for an empty or unparseable gold.
    """
    if fmt not in GOLD_FORMATS:
        raise ValueError(f"unknown gold format {fmt!r} (expected one of {', '.join(GOLD_FORMATS)})")
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"gold answer must be a string or number, got {type(raw).__name__}")
    if isinstance(raw, float):  # AMC golds are floats (27.0); the decimal repr is taken exactly
        if not math.isfinite(raw):
            raise ValueError(f"gold answer is not a finite number: {raw!r}")
        return _canonical_number(format(Decimal(repr(raw)), "f"))
    if isinstance(raw, int):
        return str(raw)
    text = str(raw).translate(_UNICODE).strip()
    if not text:
        raise ValueError("gold answer is empty")
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else ("amc" if _PLAIN_NUM_RE.match(text) else "math")
    if fmt == "gsm8k":
        if "####" not in text:
            raise ValueError("GSM8K gold has no '#### N' line")
        tail = text.rsplit("####", 1)[1].strip()
        tail = _number_text(tail.splitlines()[0]) if tail else ""
        if not _PLAIN_NUM_RE.match(tail):
            raise ValueError(f"GSM8K gold after '####' is not a number: {tail!r}")
        return _canonical_number(tail)
    if fmt == "aime":
        if not re.fullmatch(r"[-+]?\d+", text):
            raise ValueError(f"AIME gold is not an integer: {text!r}")
        return str(int(text))
    if fmt == "amc":
        if not _PLAIN_NUM_RE.match(_number_text(text)):
            raise ValueError(f"AMC gold is not a number: {text!r}")
        return _canonical_number(_number_text(text))
    if fmt == "plain":
        return text
    return _normalize_math_gold(text)


_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*\{")
_SPACE_RE = re.compile(r"\s*")


def _normalize_math_gold(text: str) -> str:
    """Peels `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]` and whole-string `\\boxed{...}` wrappers, in any order and
    depth. The wrappers are peeled by moving two indices inward (never re-slicing the string) and braces are
    matched in one pass, so a gold of any size or nesting is normalised in linear time."""
    lo, hi = 0, len(text)
    closing = None
    while True:
        lo = _SPACE_RE.match(text, lo, hi).end()
        while hi > lo and text[hi - 1].isspace():
            hi -= 1
        for left, right in _MATH_WRAPPERS:
            if hi - lo > len(left) + len(right) and text.startswith(left, lo, hi) and text.endswith(right, lo, hi):
                lo, hi = lo + len(left), hi - len(right)
                break
        else:
            box = _BOX_OPEN_RE.match(text, lo, hi)
            if box is None or text[hi - 1] != "}":
                break
            if closing is None:
                closing = _closing_braces(text)
            if closing.get(box.end() - 1) != hi - 1:  # `\boxed{1} + \boxed{2}` is not one wrapper
                break
            lo, hi = box.end(), hi - 1
    text = text[lo:hi].strip()
    if not text.strip("$ "):
        raise ValueError("gold answer is empty once its $...$ / \\boxed{} wrapper is removed")
    if brace_depth_ok(text) is False:
        raise ValueError(f"gold answer has unbalanced braces: {text[:200]!r}")
    return text


# ---------------------------------------------------------------------------------------- extraction
_BOX_CMD_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_RE = re.compile(
    r"(?:\bfinal\s+answer|\banswer)\s*(?:\*\*)?\s*(?:is\b\s*(?:\*\*)?\s*:?|:|=)(?:\*\*)?[ \t]*", re.I
)
_LAST_NUM_RE = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:\\[dt]?frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d)"
    r"|\d+\s*/\s*\d+(?![\d.])|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?|\.\d+)"
)
_MATH_ENV_RE = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox|mathbf|textit)\s*\{(.*)\}$", re.S)
_UNIT_RE = re.compile(
    rf"^({_PLAIN_NUM}|\d+/\d+)\s*(?:\\(?:text|mbox|mathrm)\s*\{{\s*[A-Za-z][A-Za-z .'/-]*\}}"
    r"|\s[A-Za-z][A-Za-z'\-]+(?:\s+[A-Za-z][A-Za-z'\-]*)*)$"
)
_NOT_UNITS = {"pi", "sqrt", "and", "or", "i"}
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}[,;]?\s+[A-Za-z]{2,}(?![A-Za-z]*\})")
_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.S)  # an escaped character (skipped), or a brace
_ESCAPED_RE = re.compile(r"\\.", re.S)
_NOT_BRACE_RE = re.compile(r"[^{}]+")
_DEPTH = {"{": 1, "}": -1}


def brace_depth_ok(s: str) -> bool:
    """True if `{`/`}` (escaped ones ignored) are balanced in `s`. Linear, and at C speed (a megabyte of braces
    takes milliseconds): escapes and other characters are dropped by regexes, the depth is a running sum."""
    if "{" not in s and "}" not in s:
        return True
    braces = _NOT_BRACE_RE.sub("", _ESCAPED_RE.sub("", s) if "\\" in s else s)
    if 2 * braces.count("{") != len(braces):
        return False
    return min(accumulate(map(_DEPTH.__getitem__, braces)), default=0) >= 0


def _closing_braces(text: str) -> dict[int, int]:
    """Position of every `{` that is closed -> position of its `}` (escaped `\\{` `\\}` ignored), in one pass."""
    stack: list[int] = []
    closing: dict[int, int] = {}
    for m in _BRACE_TOKEN_RE.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            closing[stack.pop()] = m.start()
    return closing


_BOX_TOKEN_RE = re.compile(r"[^\s$]+")
_HSPACE_RE = re.compile(r"[ \t]*")


def _last_boxed(text: str) -> str | None:
    """Contents of the last closed `\\boxed{...}` / `\\fbox{...}` (or `\\boxed 5`), or None. Linear time: the braces
    are matched once for the whole text, not once per `\\boxed{` (20,000 nested unclosed boxes take milliseconds)."""
    boxes = list(_BOX_CMD_RE.finditer(text))
    closing = None
    for m in reversed(boxes):
        i = _HSPACE_RE.match(text, m.end()).end()
        if i < len(text) and text[i] == "{":
            if closing is None:
                closing = _closing_braces(text)
            end = closing.get(i)
            if end is not None:  # an unclosed box (truncated output) is skipped
                return text[i + 1 : end]
        elif i > m.end():  # `\boxed 5`: one token, up to whitespace or `$`
            tok = _BOX_TOKEN_RE.match(text, i)
            if tok:
                return tok.group(0)
    return None


def clean_answer(span: str) -> str:
    """Trims an extracted span to the answer: math delimiters, punctuation, currency, \\text{} and units."""
    s = span.translate(_UNICODE).strip()
    for _ in range(4):  # peel layers until nothing changes
        before = s
        s = s.strip().strip("*").strip()
        env = _MATH_ENV_RE.match(s)
        if env:
            s = next(g for g in env.groups() if g is not None)
        s = s.rstrip(" \t.,;:!?").rstrip("$").rstrip()
        if s.endswith(("\\)", "\\]")):
            s = s[:-2]
        s = re.sub(r"^(?:\\\$|\$(?=\s*[-+.\d]))\s*", "", s)  # currency, not a math opener
        wrap = _TEXT_WRAP_RE.match(s)
        if wrap and brace_depth_ok(wrap.group(1)):
            s = wrap.group(1)
        unit = _UNIT_RE.match(s)
        if unit and s[len(unit.group(1)) :].split()[0].strip().lower() not in _NOT_UNITS:
            s = unit.group(1)
        if s == before:
            break
    return s.strip()


_LEAD_RE = re.compile(r"[ *]*")
_SENTENCE_END_RE = re.compile(r"(?<!\d)\.(?=\s|$)|\.(?=\s+[A-Z])")
# Bounds that keep the answer-phrase rule linear: only the last phrases are tried, and an "answer" that runs on
# for more characters than this without ending its sentence is prose, not an answer.
_ANSWER_PHRASES = 100
_ANSWER_SPAN = 1000


def _after_answer_phrase(text: str) -> str | None:
    """The cleaned answer after the last "answer is" / "Final answer:" that has one (of the last 100 such
    phrases; spans of at most 1,000 characters, so a megabyte of "answer is \\boxed{" stays linear)."""
    for m in reversed(list(_ANSWER_RE.finditer(text))[-_ANSWER_PHRASES:]):
        pos = m.end()
        start = _LEAD_RE.match(text, pos).end()
        env = _MATH_ENV_RE.match(text, start, min(len(text), start + _ANSWER_SPAN))
        if env:
            span = env.group(0)
        else:  # to the end of the sentence on this line (positions, not a copy of the rest of the text)
            line_end = text.find("\n", pos, pos + _ANSWER_SPAN)
            line_end = min(len(text), pos + _ANSWER_SPAN) if line_end < 0 else line_end
            stop = _SENTENCE_END_RE.search(text, pos, line_end)
            span = text[pos : stop.start() if stop else line_end]
        answer = clean_answer(span)
        if answer and _PROSE_RE.search(answer):  # "... is that Tom has 5 apples" -> 5
            nums = list(_LAST_NUM_RE.finditer(answer))
            answer = nums[-1].group(0) if nums else answer
        if answer and brace_depth_ok(answer):  # an unclosed `\boxed{4` (truncated) is no answer
            return answer
    return None


def extract_answer(text: str, policy: str = "lenient") -> Extraction:
    """The final answer in a completion and the rule that found it (`Extraction(None, None)` if none)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown extraction policy {policy!r} (expected one of {', '.join(POLICIES)})")
    text = text or ""
    boxed = _last_boxed(text)
    if boxed is not None and clean_answer(boxed):
        return Extraction(clean_answer(boxed), "boxed")
    if policy == "boxed":
        return Extraction(None, None)
    for m in reversed(list(_HASH_RE.finditer(text))):
        answer = clean_answer(m.group(1))
        if answer:
            return Extraction(answer, "hash")
    answer = _after_answer_phrase(text)
    if answer:
        return Extraction(answer, "answer_is")
    nums = list(_LAST_NUM_RE.finditer(text))
    if nums:
        return Extraction(nums[-1].group(0).strip(), "last_number")
    return Extraction(None, None)


def looks_like_bare_answer(text: str) -> bool:
    """True for an answer written on its own (`\\frac{1}{2}`, `(3,4]`, `42 apples`, `1+1+...+1` however long), not
    prose. Decided by content alone: one line, no answer marker (`####`, `\\boxed`, "answer"), and no words but a
    name or a unit."""
    t = text.strip()
    if not t or "\n" in t or "####" in t or _BOX_CMD_RE.search(t):
        return False
    if re.search(r"\banswer\b", t, re.I):
        return False
    # An answer has no words (3+ letters, outside LaTeX commands and \text{}) except a name
    # (`Evelyn`) or a unit after a number (`42 apples`); "I think 42" is prose.
    words = _WORD_RE.findall(re.sub(r"\\[A-Za-z]+\s*\{[^{}]*\}", " ", t))
    if not words:
        return True
    return len(words) == 1 and (not re.search(r"\d", t) or _UNIT_RE.match(t.rstrip(" .")) is not None)


def extract_or_whole(text: str, policy: str = "lenient") -> Extraction:
    """For inputs that may be a bare answer or a completion (the `ssb verify` CLI): a bare answer is
    used whole (so `(3,4]` is not cut to its last number); otherwise the policy extracts, falling
    back to the whole cleaned string."""
    if looks_like_bare_answer(text):
        whole = clean_answer(text)
        return Extraction(whole or None, "whole" if whole else None)
    found = extract_answer(text, policy)
    if found.answer is not None:
        return found
    whole = clean_answer(text)
    return Extraction(whole or None, "whole" if whole else None)


# ---------------------------------------------------------------------------------------- judging
# How a text is read before it is compared: "answer" (already an answer: only cleaned), a policy
# ("lenient", "boxed": extracted from a completion), or "whole:<policy>" (`extract_or_whole`).
HOWS = ("answer", *POLICIES, *(f"whole:{p}" for p in POLICIES))

_SAME_TEXT = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\(?:left|right)(?=[()\[\]|.]|\\[{}])"), ""),
    (re.compile(r"\s*([-+=,;()\[\]{}^_/])\s*"), r"\1"),
]


def _same_text(s: str) -> str:
    for pattern, repl in _SAME_TEXT:
        s = pattern.sub(repl, s)
    return s.strip()


def fast_verdict(pred: str, gold: str) -> str | None:
    """Exact verdict when both answers are plain numbers or simple fractions, or are the same text
    up to spacing / `\\dfrac` / `\\left(`; None otherwise (the symbolic comparison decides)."""
    if pred == gold or _same_text(pred) == _same_text(gold):
        return "correct"
    p = as_fraction(pred)
    if p is None:
        return None
    g = as_fraction(gold)
    if g is None:
        return None
    return "correct" if p == g else "incorrect"


def read_answer(text: str, how: str) -> Extraction:
    """The answer in `text` read as `how` says (see HOWS)."""
    if how == "answer":
        answer = clean_answer(text)
        return Extraction(answer or None, None)
    if how.startswith("whole:"):
        return extract_or_whole(text, how.removeprefix("whole:"))
    return extract_answer(text, how)


def prejudge(text: str, gold: str, how: str) -> tuple[Extraction, str, str | None]:
    """(what was extracted, the cleaned answer to compare, the verdict or None when only the symbolic
    comparison can decide). `gold` is already normalised."""
    if how not in HOWS:
        raise ValueError(f"unknown answer reading {how!r} (expected one of {', '.join(HOWS)})")
    found = read_answer(text or "", how)
    pred = clean_answer(found.answer or "")
    if not pred:
        return found, pred, "unparsed"
    return found, pred, fast_verdict(pred, gold)
