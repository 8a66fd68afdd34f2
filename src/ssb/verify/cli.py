"""`ssb verify`: the answer checker on its own, for one prediction or a JSONL file of them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from ssb.files import atomic_write_text
from ssb.verify.extract import GOLD_FORMATS, POLICIES, normalize_gold
from ssb.verify.verifier import VERDICTS, Verifier, check


class _BadRecord(ValueError):
    pass


def _read_records(path: Path, args) -> tuple[list[tuple[dict, str, str, str]], int]:
    """(record, pred, gold, policy) per good line and the number of skipped bad lines."""
    records, skipped = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _BadRecord(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                records.append(_parse_record(line, args))
            except _BadRecord as e:
                if not args.skip_bad_records:
                    raise _BadRecord(f"{path}:{lineno}: {e}") from None
                skipped += 1
                if skipped <= 5:
                    print(f"ssb verify: skipping {path}:{lineno}: {e}", file=sys.stderr)
    return records, skipped


def _parse_record(line: str, args) -> tuple[dict, str, str, str]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise _BadRecord("invalid JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise _BadRecord(f"expected a JSON object, got {type(rec).__name__}")
    for field in ("pred", "gold"):
        if field not in rec:
            raise _BadRecord(f"missing field {field!r}")
    pred = rec["pred"]
    if isinstance(pred, bool) or not isinstance(pred, (str, int, float)):
        raise _BadRecord(f"field 'pred' must be a string, got {type(pred).__name__}")
    try:
        gold = normalize_gold(rec["gold"], args.gold_format)
    except ValueError as e:
        raise _BadRecord(f"invalid field 'gold': {e}") from None
    policy = rec.get("policy", args.policy)
    if policy not in POLICIES:
        raise _BadRecord(f"invalid field 'policy': {policy!r} (expected one of {', '.join(POLICIES)})")
    return rec, str(pred), gold, policy


def _write_atomic(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(lines))


def _verify_file(args) -> int:
    start = time.perf_counter()
    path = Path(args.input)
    try:
        records, skipped = _read_records(path, args)
    except _BadRecord as e:
        print(f"ssb verify: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"ssb verify: error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    with Verifier(timeout=args.timeout, workers=args.workers) as verifier:
        # extraction included: a text too long to read here is read in a worker, under the deadline
        judged = verifier.check_many(
            [(pred, gold) for _, pred, gold, _ in records], [policy for *_, policy in records], whole=True
        )
        stats = verifier.stats
    verdicts = [v.verdict for v in judged]
    out = [
        json.dumps(
            {**rec, "extracted": v.extracted, "rule": v.rule, "verdict": v.verdict, "correct": v.correct},
            ensure_ascii=False,
        )
        + "\n"
        for (rec, *_), v in zip(records, judged)
    ]
    if args.output:
        try:
            _write_atomic(Path(args.output), out)
        except OSError as e:
            print(f"ssb verify: error: cannot write {args.output}: {e}", file=sys.stderr)
            return 2
    else:
        sys.stdout.writelines(out)
    seconds = time.perf_counter() - start
    counts = Counter(verdicts)
    summary = {
        "lines": len(records),
        **{v: counts[v] for v in VERDICTS},
        "skipped": skipped,
        "pooled": stats["pooled"],
        "seconds": round(seconds, 3),
        "lines_per_s": round(len(records) / seconds, 1) if seconds > 0 else None,
    }
    print(json.dumps(summary), file=sys.stdout if args.output else sys.stderr)
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    """`ssb verify PRED GOLD` (exit 0 iff correct) or `ssb verify --input F.jsonl [--output G.jsonl]`."""
    ap = argparse.ArgumentParser(
        prog="ssb verify",
        description="Check answers against gold answers. PRED may be a bare answer or a whole completion.",
        epilog="Answers starting with '-' go after '--': ssb verify -- '-\\frac{1}{2}' -0.5",
    )
    ap.add_argument("pred", nargs="?", help="predicted answer or completion")
    ap.add_argument("gold", nargs="?", help="gold answer")
    ap.add_argument("--policy", choices=POLICIES, default="lenient", help="answer extraction policy")
    ap.add_argument("--gold-format", choices=GOLD_FORMATS, default="auto", help="how to read golds")
    ap.add_argument("--input", metavar="F.jsonl", help="lines with 'pred' and 'gold' (optional 'policy')")
    ap.add_argument("--output", metavar="G.jsonl", help="write verified lines here (default: stdout)")
    ap.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed lines")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds allowed per answer (default 5)")
    ap.add_argument("--workers", type=int, default=2, help="verification worker processes (default 2)")
    try:
        args = ap.parse_args(argv)
        if args.input and args.pred is not None:
            ap.error("give either PRED GOLD or --input, not both")
        if not args.input and (args.pred is None or args.gold is None):
            ap.error("PRED and GOLD are required (or --input F.jsonl)")
        if args.timeout <= 0 or args.workers < 1:
            ap.error("--timeout must be > 0 and --workers >= 1")
    except SystemExit as e:
        return int(e.code or 0)
    if args.input:
        return _verify_file(args)
    try:
        gold = normalize_gold(args.gold, args.gold_format)
    except ValueError as e:
        print(f"ssb verify: error: gold: {e}", file=sys.stderr)
        return 2
    verdict = check(args.pred, gold, args.policy, args.timeout, whole=True).verdict
    print(verdict)
    return 0 if verdict == "correct" else 1
