"""Reading the JSONL files one stage hands to the next, checked: every error names file, line and field.

A stage trusts nothing it reads. `read_checked(path, kind)` reads a JSONL artifact (`ssb.files.read_jsonl`: a torn
last line is reported and dropped) and checks each record against the fields its kind needs, so a malformed record
is a `RecordError` (a ValueError) such as

    RUN/rollouts.jsonl:7: field 'rollouts[2].verdict': expected one of correct, incorrect, unparsed, timeout, got 'ok'

instead of a KeyError or TypeError deep inside a stage. The checks are on shape and type, the things code indexes
into; values a stage only copies along are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssb.files import read_jsonl

VERDICTS = ("correct", "incorrect", "unparsed", "timeout")
FINISH_REASONS = ("stop", "length")


class RecordError(ValueError):
    """A malformed record in a file ssb reads; the message names file, line and field."""


def _kind_name(kinds: tuple) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list"}
    names[dict] = "an object"
    return " or ".join(names.get(k, "null" if k is type(None) else k.__name__) for k in kinds)


def need(rec: dict, where: str, name: str, *kinds: type, label: str | None = None, nonempty: bool = False) -> Any:
    """rec[name], which must exist and be of one of `kinds` (bool is not an int; an int is a float)."""
    label = label or name
    if name not in rec:
        raise RecordError(f"{where}: missing field '{label}'")
    value = rec[name]
    ok = any(
        isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
        for k in (kinds + ((int,) if float in kinds else ()))
    )
    if not ok:
        raise RecordError(f"{where}: field '{label}': expected {_kind_name(kinds)}, got {_short(value)}")
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise RecordError(f"{where}: field '{label}' is empty")
    return value


def one_of(rec: dict, where: str, name: str, choices: tuple, label: str | None = None) -> Any:
    value = need(rec, where, name, str, label=label)
    if value not in choices:
        expected = ", ".join(choices)
        raise RecordError(f"{where}: field '{label or name}': expected one of {expected}, got {_short(value)}")
    return value


def messages(rec: dict, where: str, name: str) -> list:
    """A non-empty list of chat messages {'role': str, 'content': str}."""
    value = need(rec, where, name, list, nonempty=True)
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(f"{where}: field '{name}[{j}]': expected {{'role': str, 'content': str}}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- kinds


def gold(rec: dict, where: str, name: str = "gold") -> str:
    """A gold answer the verifier can read (`normalize_gold`)."""
    from ssb.verify.extract import normalize_gold

    value = need(rec, where, name, str, nonempty=True)
    try:
        normalize_gold(value, "auto")
    except ValueError as e:
        raise RecordError(f"{where}: field '{name}': {e}") from None
    return value


def check_rollout(rec: dict, where: str) -> None:
    """A line of RUN/rollouts.jsonl, as curate reads it."""
    need(rec, where, "id", str, nonempty=True)
    need(rec, where, "question", str)
    gold(rec, where)
    rollouts = need(rec, where, "rollouts", list, nonempty=True)
    for j, r in enumerate(rollouts):
        label = f"rollouts[{j}]"
        if not isinstance(r, dict):
            raise RecordError(f"{where}: field '{label}': expected an object, got {_short(r)}")
        need(r, where, "text", str, label=f"{label}.text")
        one_of(r, where, "verdict", VERDICTS, label=f"{label}.verdict")
        extracted = need(r, where, "extracted", str, type(None), label=f"{label}.extracted")
        if r["verdict"] in ("correct", "incorrect") and extracted is None:
            raise RecordError(f"{where}: field '{label}.extracted': a {r['verdict']} rollout needs its answer")


def check_rollout_counted(rec: dict, where: str) -> None:
    """A line of RUN/rollouts.jsonl, as the rollout stage counts it (token counts and finish reasons too)."""
    check_rollout(rec, where)
    for j, r in enumerate(rec["rollouts"]):
        need(r, where, "num_tokens", int, label=f"rollouts[{j}].num_tokens")
        one_of(r, where, "finish_reason", FINISH_REASONS, label=f"rollouts[{j}].finish_reason")


def check_curated(rec: dict, where: str) -> None:
    """A line of RUN/curated.jsonl (what teach reads)."""
    need(rec, where, "id", str, nonempty=True)
    need(rec, where, "question", str)
    gold(rec, where)
    messages(rec, where, "teacher_messages")
    messages(rec, where, "student_messages")


def check_attempt(rec: dict, where: str) -> None:
    """A line of RUN/teach_attempts.jsonl (what a resumed teach stage reads back)."""
    need(rec, where, "id", str, nonempty=True)
    need(rec, where, "attempt", int)
    need(rec, where, "kept", bool)
    need(rec, where, "correct", bool)
    need(rec, where, "num_tokens", int)
    one_of(rec, where, "finish_reason", FINISH_REASONS)


def check_metrics(rec: dict, where: str) -> None:
    """A line of RUN/metrics.jsonl or RUN/grpo/metrics.jsonl."""
    need(rec, where, "step", int)
    for key, value in rec.items():
        if key != "step" and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RecordError(f"{where}: field '{key}': expected a number or null, got {_short(value)}")


def check_id_only(rec: dict, where: str) -> None:
    need(rec, where, "id", str, nonempty=True)


def read_checked(
    path: str | Path, check: Callable[[dict, str], None], *, repair: bool = True, missing_ok: bool = True
) -> list[dict]:
    """The records of a JSONL artifact, each an object passing `check(record, "FILE:LINE")`."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(f"{path}: missing")
    if path.is_dir():
        raise RecordError(f"{path}: is a directory, not a JSONL file")
    out = []
    for line, rec in read_jsonl(path, repair=repair, lines=True):
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: expected a JSON object, got {_short(rec)}")
        check(rec, where)
        out.append(rec)
    return out
