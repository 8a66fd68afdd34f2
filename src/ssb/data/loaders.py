"""Loading (question, gold answer) records from the built-in generator, local files, benchmarks and the Hub.

Everything becomes an `Example(id, question, answer, source)` whose `answer` is the normalised gold answer.
Malformed records raise `DataError` naming file, line and field, unless `skip_bad_records` is set, in which
case they are counted and reported as one warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ssb.config import DatasetSpec

# name -> (Hub id, Hub config, split for "test", local file stem, answer format)
BENCHMARKS: dict[str, tuple[str, str | None, str, str, str]] = {
    "gsm8k": ("openai/gsm8k", "main", "test", "gsm8k", "gsm8k"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "math500", "math"),
    "aime24": ("math-ai/aime24", None, "test", "aime24", "aime"),
    "amc23": ("math-ai/amc23", None, "test", "amc23", "amc"),
}
QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "expected_answer", "target", "solution")
ID_FIELDS = ("id", "unique_id", "idx", "uid")


class DataError(ValueError):
    """A malformed record; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str
    source: str
    # problems that are not independent draws share a cluster: built-in arithmetic problems asking for the same
    # calculation (ArithProblem.key); None = the problem is its own cluster. Bootstraps resample clusters.
    cluster: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(record: dict, wanted: str | None, candidates: Iterable[str]) -> str | None:
    if wanted is not None:
        return wanted
    return next((c for c in candidates if c in record), None)


def _records_from_file(path: Path) -> Iterable[tuple[int, Any]]:
    """(line number or row index, raw record) pairs; JSON errors carry the line number."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one)")
        yield from enumerate(data, 1)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from enumerate(pq.read_table(path).to_pylist(), 1)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .jsonl, .json or .parquet)")


def _to_example(record: Any, where: str, spec: DatasetSpec, fmt: str, source: str, index: int) -> Example:
    from ssb.verify import extract_answer, normalize_gold

    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    qf = _pick(record, spec.question_field, QUESTION_FIELDS)
    af = _pick(record, spec.answer_field, ANSWER_FIELDS)
    if qf is None or qf not in record:
        raise DataError(
            f"{where}: missing field '{qf or 'question'}' (fields: {', '.join(record)}); set question_field"
        )
    if af is None or af not in record:
        raise DataError(f"{where}: missing field '{af or 'answer'}' (fields: {', '.join(record)}); set answer_field")
    question, raw = record[qf], record[af]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field '{qf}' is empty or not text")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: field '{af}' is empty")
    if af == "solution" and isinstance(raw, str) and "\\boxed" in raw:
        raw = extract_answer(raw, policy="boxed").answer or raw
    try:
        answer = normalize_gold(raw, fmt)
    except ValueError as e:
        raise DataError(f"{where}: field '{af}': unparseable gold answer {str(raw)[:80]!r} ({e})") from None
    idf = _pick(record, spec.id_field, ID_FIELDS)
    rid = str(record[idf]) if idf and record.get(idf) is not None else f"{source}-{index:06d}"
    return Example(id=rid, question=question.strip(), answer=answer, source=source)


def _convert(
    rows: Iterable[tuple[int, Any]], where: str, spec: DatasetSpec, fmt: str, source: str
) -> tuple[list[Example], int]:
    out, bad, first_error = [], 0, None
    for n, record in rows:
        try:
            out.append(_to_example(record, f"{where}:{n}", spec, fmt, source, n))
        except DataError as e:
            if not spec.skip_bad_records:
                raise
            bad += 1
            first_error = first_error or str(e)
    if bad:
        print(f"warning: skipped {bad} malformed record(s) in {where} (first: {first_error})", flush=True)
    return out, bad


def _local_benchmark_file(name: str, split: str) -> Path | None:
    stem = BENCHMARKS[name][3]
    for d in filter(None, [os.environ.get("SSB_DATA_DIR")]):
        p = Path(d) / f"{stem}_{split}.jsonl"
        if p.exists():
            return p
    return None


def load_examples(spec: DatasetSpec, data_file: str | Path | None = None) -> list[Example]:
    """Examples for a dataset spec, after `offset` and `limit`. `data_file` overrides where a benchmark's
    records come from (a local copy in the same format, e.g. ../shared/data/gsm8k_test.jsonl)."""
    from ssb.data import arith

    src = spec.source
    if src == "arith":
        n = spec.limit if spec.limit is not None else 500
        probs = arith.generate(spec.split, level=spec.level, n=n, offset=spec.offset)
        return [Example(p.id, p.question, str(p.answer), f"arith-l{spec.level}", cluster=p.key) for p in probs]
    fmt = spec.answer_format
    if src in BENCHMARKS:
        hub, subset, _, _, bench_fmt = BENCHMARKS[src]
        fmt = bench_fmt if fmt == "auto" else fmt
        local = Path(data_file) if data_file else _local_benchmark_file(src, spec.split)
        if local is not None:
            examples = _load_file(local, spec, fmt, src)
        else:
            examples = _load_hub(hub, subset or spec.subset, spec.split, spec, fmt, src)
    elif data_file or Path(src).suffix.lower() in (".jsonl", ".json", ".parquet") or Path(src).exists():
        path = Path(data_file or src)
        examples = _load_file(path, spec, fmt, path.stem)
    else:
        examples = _load_hub(src, spec.subset, spec.split, spec, fmt, src.split("/")[-1])
    examples = examples[spec.offset :]
    return examples[: spec.limit] if spec.limit is not None else examples


def _load_file(path: Path, spec: DatasetSpec, fmt: str, source: str) -> list[Example]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    examples, _ = _convert(_records_from_file(path), str(path), spec, fmt, source)
    if not examples:
        raise DataError(f"{path}: no usable records")
    _check_unique_ids(examples, str(path))
    return examples


def _load_hub(name: str, subset: str | None, split: str, spec: DatasetSpec, fmt: str, source: str) -> list[Example]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError("loading Hub datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds; all mean "could not load"
        raise DataError(
            f"could not load Hub dataset {name!r} (config {subset!r}, split {split!r}): {e}. "
            f"Without the Hub, pass a local copy (e.g. --data FILE.jsonl)"
        ) from None
    examples, _ = _convert(enumerate(ds, 1), f"{name}[{split}] row", spec, fmt, source)
    _check_unique_ids(examples, name)
    return examples


def _check_unique_ids(examples: list[Example], where: str) -> None:
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            raise DataError(
                f"{where}: duplicate id {ex.id!r} (records {seen[ex.id] + 1} and {i + 1}); "
                f"set id_field to a unique field"
            )
        seen[ex.id] = i


def question_records(spec: DatasetSpec) -> list[dict]:
    """The questions of a data spec as plain dicts (id, question, answer, source), as stages store them."""
    return [{k: v for k, v in e.to_dict().items() if k != "cluster"} for e in load_examples(spec)]
