"""Prompt building: the student's plain question prompt and the teacher's hinted prompt.

Both are chat messages rendered later with the model's own chat template (never flattened to plain text): the
student is trained and evaluated on exactly `student_messages`, and the teacher sees `teacher_messages`.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
_FIELD = re.compile(r"{(question|correct|wrong)}")


def student_messages(question: str, system_prompt: str) -> list[dict]:
    """The plain prompt: system prompt + the question, nothing else."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]


def load_template(path: str | Path | None, negative: bool = True, order: str = "correct_first") -> str:
    """Read a hinted-prompt template (a path, or the name of a built-in: "short") and check its placeholders.
    Errors name the file.

    Placeholders are the literal tokens {question}, {correct} and {wrong}; every other brace is kept as written
    (templates speak LaTeX: `\\boxed{answer}` stays as it is). `order` ("correct_first" or "wrong_first") says
    which attempt the hint shows first: built-ins have a variant for each; a template file must already place
    its {correct} and {wrong} in that order. Without a negative there is one attempt and order does not apply.
    """
    if order not in ("correct_first", "wrong_first"):
        raise ValueError(f"hint order must be 'correct_first' or 'wrong_first', got {order!r}")
    suffix = "_no_negative" if not negative else ("_wrong_first" if order == "wrong_first" else "")
    if path is None:
        path = TEMPLATES / f"hint{suffix}.txt"
    elif "/" not in str(path) and (TEMPLATES / f"hint_{path}.txt").exists():  # a built-in by name, e.g. "short"
        path = TEMPLATES / f"hint_{path}{suffix}.txt"
    path = Path(path)
    if not path.exists():
        names = sorted(
            p.stem[len("hint_") :]
            for p in TEMPLATES.glob("hint_*.txt")
            if "negative" not in p.stem and "first" not in p.stem
        )
        raise ValueError(f"hint template not found: {path} (give a file path or a built-in name: {', '.join(names)})")
    text = path.read_text(encoding="utf-8")
    found = set(_FIELD.findall(text))
    required = {"question", "correct"} | ({"wrong"} if negative else set())
    if required - found:
        raise ValueError(f"{path}: template lacks placeholder(s) {sorted('{' + m + '}' for m in required - found)}")
    if not negative and "wrong" in found:
        raise ValueError(f"{path}: the no-negative variant has no wrong attempt to fill {{wrong}}")
    if negative:
        wrong_first = text.index("{wrong}") < text.index("{correct}")
        if wrong_first != (order == "wrong_first"):
            raise ValueError(
                f"{path}: curate.order is {order!r} but the template shows the "
                f"{'wrong' if wrong_first else 'correct'} attempt first; reorder its placeholders or set curate.order"
            )
    return text


def hinted_user_prompt(template: str, question: str, correct: str, wrong: str | None) -> str:
    # One pass over the template, so a solution that itself contains "{wrong}" is never substituted again.
    values = {"question": question.strip(), "correct": correct.strip(), "wrong": (wrong or "").strip()}
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def teacher_messages(template: str, question: str, correct: str, wrong: str | None, system_prompt: str) -> list[dict]:
    """The hinted prompt: same system prompt, the question plus the correct (and wrong) rollout."""
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": hinted_user_prompt(template, question, correct, wrong)},
    ]
