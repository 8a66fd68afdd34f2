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
from ssb.files import decode_utf8

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
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "")
                except UnicodeDecodeError as e:
                    yield (
                        n,
                        DataError(
                            f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "save the file as UTF-8"
                        ),
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
                except RecursionError:  # thousands of nested brackets
                    yield n, DataError(f"{path}:{n}: not usable JSON (nested too deeply)")
    elif suffix == ".json":
        try:
            data = json.loads(decode_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # not UTF-8: the message names the line
            raise DataError(str(e)) from None
        except RecursionError:
            raise DataError(f"{path}: not usable JSON (nested too deeply)") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records (or an object holding one)")
        yield from enumerate(data, 1)
    elif suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pyarrow.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        yield from enumerate(table.to_pylist(), 1)
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
    if spec.id_field is not None and spec.id_field not in record:
        raise DataError(f"{where}: missing field '{spec.id_field}' (data id_field; fields: {', '.join(record)})")
    if idf and record.get(idf) is not None:
        value = record[idf]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{where}: field '{idf}': an id must be a string or an integer, got {type(value).__name__}")
        rid = str(value)
        if not rid.strip():
            raise DataError(f"{where}: field '{idf}' is empty; every record needs an id (or leave the field out)")
    else:
        rid = f"{source}-{index:06d}"
    return Example(id=rid, question=question.strip(), answer=answer, source=source)


def _convert(
    rows: Iterable[tuple[int, Any]], where: str, spec: DatasetSpec, fmt: str, source: str
) -> tuple[list[Example], list[int]]:
    """The good records as Examples and the line (or row) each came from."""
    out, lines, bad, first_error = [], [], 0, None
    for n, record in rows:
        try:
            out.append(_to_example(record, f"{where}:{n}", spec, fmt, source, n))
            lines.append(n)
        except DataError as e:
            if not spec.skip_bad_records:
                raise
            bad += 1
            first_error = first_error or str(e)
    if bad:
        print(f"warning: skipped {bad} malformed record(s) in {where} (first: {first_error})", flush=True)
    return out, lines


def _local_benchmark_file(name: str, split: str) -> Path | None:
    stem = BENCHMARKS[name][3]
    for d in filter(None, [os.environ.get("SSB_DATA_DIR")]):
        p = Path(d) / f"{stem}_{split}.jsonl"
        if p.exists():
            return p
    return None


def _local_file(spec: DatasetSpec, data_file: str | Path | None) -> Path | None:
    """The local file a spec's records come from, or None (the generator, or the Hub)."""
    src = spec.source
    if src == "arith":
        return None
    if src in BENCHMARKS:
        return Path(data_file) if data_file else _local_benchmark_file(src, spec.split)
    if data_file or Path(src).suffix.lower() in (".jsonl", ".json", ".parquet") or Path(src).exists():
        return Path(data_file or src)
    return None


def data_files(spec: DatasetSpec, data_file: str | Path | None = None) -> list[Path]:
    """The local files `load_examples(spec, data_file)` reads: a stage lists them as inputs, so a changed data file
    is noticed (the generator and Hub datasets have none)."""
    local = _local_file(spec, data_file)
    return [local] if local is not None else []


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
    local = _local_file(spec, data_file)
    if src in BENCHMARKS:
        hub, subset, _, _, bench_fmt = BENCHMARKS[src]
        fmt = bench_fmt if fmt == "auto" else fmt
        if local is not None:
            examples = _load_file(local, spec, fmt, src)
        else:
            examples = _load_hub(hub, subset or spec.subset, spec.split, spec, fmt, src)
    elif local is not None:
        examples = _load_file(local, spec, fmt, local.stem)
    else:
        examples = _load_hub(src, spec.subset, spec.split, spec, fmt, src.split("/")[-1])
    examples = examples[spec.offset :]
    return examples[: spec.limit] if spec.limit is not None else examples


def _load_file(path: Path, spec: DatasetSpec, fmt: str, source: str) -> list[Example]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    examples, lines = _convert(_records_from_file(path), str(path), spec, fmt, source)
    if not examples:
        raise DataError(f"{path}: no usable records")
    _check_unique_ids(examples, str(path), lines)
    return examples


def _load_hub(name: str, subset: str | None, split: str, spec: DatasetSpec, fmt: str, source: str) -> list[Example]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError("loading Hub datasets needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # noqa: BLE001 - the Hub raises many kinds; all mean "could not load"
        local = (
            f"set SSB_DATA_DIR to a folder holding {BENCHMARKS[source][3]}_{split}.jsonl or "
            if source in BENCHMARKS
            else ""
        )
        raise DataError(
            f"could not load Hub dataset {name!r} (config {subset!r}, split {split!r}): {e}. "
            f"Without the Hub, {local}pass a local copy (e.g. --data FILE.jsonl)"
        ) from None
    examples, lines = _convert(enumerate(ds, 1), f"{name}[{split}] row", spec, fmt, source)
    _check_unique_ids(examples, f"{name}[{split}] row", lines)
    return examples


def _check_unique_ids(examples: list[Example], where: str, lines: list[int]) -> None:
    seen: dict[str, int] = {}
    for ex, line in zip(examples, lines):
        if ex.id in seen:
            raise DataError(
                f"{where}:{line}: field 'id': duplicate id {ex.id!r} (also at {where}:{seen[ex.id]}); "
                f"set id_field to a unique field"
            )
        seen[ex.id] = line


def question_records(spec: DatasetSpec) -> list[dict]:
    """The questions of a data spec as plain dicts (id, question, answer, source), as stages store them."""
    return [{k: v for k, v in e.to_dict().items() if k != "cluster"} for e in load_examples(spec)]
