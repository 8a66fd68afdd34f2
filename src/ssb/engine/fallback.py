"""Generation for models the engine's own layer loop does not implement: Hugging Face `generate`.

`Engine` uses this for any model type outside `ssb.engine.cache.SUPPORTED_MODEL_TYPES` (Gemma, Phi-3, OLMo 2,
Granite, ...), with a one-line message, so an unsupported architecture is slow rather than wrong. Prompts are
batched only with prompts of the same token length, so no padding ever enters (left padding changes positions
and masks in ways that some architectures handle differently); each batch is one `model.generate` call with
the same stop tokens, temperature, top-k, top-p and max_new_tokens, seeded from (seed, batch). Samples are
reproducible for the same prompts, batch size and seed, but are not the engine's per-sequence streams.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import torch

from ssb.engine.progress import TokenProgress
from ssb.engine.scheduler import Completion


def hf_generate_all(engine, ids: list[list[int]], samples: int, params, done) -> TokenProgress:
    """Generate `samples` completions for each prompt in `ids`; `done(i, completions)` per prompt, in any order.
    Returns the progress record (tokens, rate)."""
    tok, model = engine.tokenizer, engine.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(engine.stop_ids)
    by_length: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for i, p in enumerate(ids):
        by_length[len(p)].extend((i, s) for s in range(samples))
    progress = TokenProgress(len(ids), len(ids) * samples, params.max_new_tokens, engine.progress, log=engine.log)
    collected: dict[int, list] = {}
    waiting = len(ids) * samples
    sampling = (
        {"do_sample": True, "temperature": params.temperature, "top_k": params.top_k or None, "top_p": params.top_p}
        if params.temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    try:
        for length in sorted(by_length):
            seqs = by_length[length]
            for start in range(0, len(seqs), engine.batch_size):
                batch = seqs[start : start + engine.batch_size]
                input_ids = torch.tensor([ids[i] for i, _ in batch], device=engine.device)
                key = hashlib.blake2b(f"{params.seed}/{batch[0]}/{ids[batch[0][0]]}".encode(), digest_size=8).digest()
                torch.manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=params.max_new_tokens,
                    eos_token_id=sorted(engine.stop_ids),
                    pad_token_id=pad,
                    **sampling,
                )
                waiting -= len(batch)
                new_tokens = 0
                for (i, s), row in zip(batch, out[:, length:].tolist()):
                    stop = next((k for k, t in enumerate(row) if t in engine.stop_ids), None)
                    token_ids = row[: stop + 1] if stop is not None else row
                    reason = "stop" if stop is not None else "length"
                    text = tok.decode(token_ids[:-1] if reason == "stop" else token_ids, skip_special_tokens=True)
                    comps = collected.setdefault(i, [None] * samples)
                    comps[s] = Completion(text, token_ids, len(token_ids), reason)
                    new_tokens += len(token_ids)
                    progress.sequence_done(len(token_ids))
                    if all(c is not None for c in comps):
                        progress.prompt_done()
                        done(i, collected.pop(i))
                progress.step(new_tokens, [], waiting)
    finally:
        progress.close()
    return progress
