"""Verification: extract a final answer from a completion and judge it against the gold answer.

`extract` turns a completion into one answer string (linear time), `equiv` compares two answers (math-verify plus
exact arithmetic guards), `worker` runs those comparisons, and the extraction of long texts, in processes with
deadlines, `verifier` combines them, and `cli` is `ssb verify`. docs/security.md states the bounds.
"""

from ssb.verify.extract import GOLD_FORMATS, POLICIES, Extraction, extract_answer, normalize_gold
from ssb.verify.verifier import VERDICTS, Verdict, Verifier, check, is_equivalent

__all__ = [
    "GOLD_FORMATS",
    "POLICIES",
    "VERDICTS",
    "Extraction",
    "Verdict",
    "Verifier",
    "check",
    "extract_answer",
    "is_equivalent",
    "normalize_gold",
]
