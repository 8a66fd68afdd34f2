"""Input checks the generating stages share: every prompt must fit the model's context with room for its answer.

A question too long for the model would stop the whole stage deep inside generation, without naming it. The
stages check first, before any output is touched: a too-long question is an error naming it (and the data file),
or, with the data spec's `skip_bad_records`, a warning naming it and the question is left out.
"""

from __future__ import annotations

from ssb.data import DataError


def too_long(cfg, model: str, prompts: list, max_new_tokens: int) -> tuple[list[tuple[int, int]], int | None]:
    """(index, prompt tokens) of the prompts whose prompt + max_new_tokens exceeds the model's context, and that
    context (None: the model's config names none, and nothing is checked)."""
    from ssb.engine.engine import tokenize_prompts
    from ssb.models import context_length, load_tokenizer

    limit = context_length(model, cfg.trust_remote_code)
    if limit is None or not prompts:
        return [], limit
    tok = load_tokenizer(model, trust_remote_code=cfg.trust_remote_code)
    lengths = [len(ids) for ids in tokenize_prompts(tok, prompts)]
    return [(i, n) for i, n in enumerate(lengths) if n + max_new_tokens > limit], limit


def fitting_questions(
    cfg, model: str, records: list, prompts: list, max_new_tokens: int, *, setting: str, spec, spec_key: str
) -> list:
    """`records` (dicts or objects with an `id`) whose prompt fits; the others fail the stage, naming the first,
    unless `spec.skip_bad_records` (then a warning names them)."""
    bad, limit = too_long(cfg, model, prompts, max_new_tokens)
    if not bad:
        return records
    ids = [_id(records[i]) for i, _ in bad]
    i, n = bad[0]
    what = (
        f"{spec.source}: question {ids[0]!r}: its prompt is {n} tokens, and with {setting}={max_new_tokens} that "
        f"exceeds the model's context of {limit} tokens"
    )
    if not spec.skip_bad_records:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"{what}{more}; shorten it, lower {setting}, or set {spec_key}.skip_bad_records=true to leave such "
            "questions out"
        )
    shown = ", ".join(repr(x) for x in ids[:10]) + (", ..." if len(ids) > 10 else "")
    print(f"warning: left out {len(bad)} question(s) too long for the model's context: {shown} (first: {what})")
    dropped = {i for i, _ in bad}
    return [r for j, r in enumerate(records) if j not in dropped]


def _id(record) -> str:
    return record["id"] if isinstance(record, dict) else record.id
