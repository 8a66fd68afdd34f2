"""Stage 4, `ssb logits`: the frozen base model's distribution over every teacher solution token, stored sparse.

The teacher input is the hinted prompt + the solution ids; the distribution over solution token j is read at
position prompt_len - 1 + j (so it includes the end-of-turn token: the student learns to stop), at the training
temperature T = train.temperature, and kept as logits.store says (`ssb.distill.store`, docs/teacher-store.md):
the top-k ids and log-probabilities plus the tail mass, tokens drawn from the teacher (sampled, seeded by
(seed, example id), so a rerun stores the same draws), the top-k head plus draws from the tail (hybrid), or the
final hidden states. Sequences run in length-sorted batches (right padding); only hidden states at solution
positions go through the output head, a chunk at a time. Finished shards survive a kill; a rerun continues with
the examples not yet stored.

With a sparse store, the first logits.reference_pairs pairs by id also get their teacher hidden states stored in
full (RUN/logits/reference/, kind hidden, 1152 B/token for SmolLM2): the trainer computes the exact
full-vocabulary KL on them each epoch, so the logged (sparse-estimate) loss can be compared with the paper's.

In online mode (logits.mode=online) nothing is stored: the trainer runs the frozen teacher in each step. Nothing is
needed either for pure cross-entropy training (train.kd_weight=0, the SFT baseline).
"""

from __future__ import annotations

import time

import torch

from ssb import parallel
from ssb.config import Config
from ssb.lifecycle import stage
from ssb.rundir import RunDir, rank_store, rank_stores

HYBRID_AUTO_HEAD = 64  # benchmarks/distill.py on SmolLM2: head 64 beat 124 at the hidden states (0.971 vs 0.964)


def needs_stored_logits(cfg: Config) -> bool:
    return cfg.logits.mode == "offline" and cfg.train.kd_weight > 0


def logits(cfg: Config, run: RunDir, force: bool = False) -> dict:
    from ssb.distill.pairs import read_pairs

    stored = needs_stored_logits(cfg)
    parts = (cfg.model, cfg.dtype, cfg.logits, cfg.train.temperature, stored)
    if cfg.logits.store in ("sampled", "hybrid"):
        parts += (cfg.seed,)  # the draws depend on it

    def check() -> None:  # bad pairs fail here, before anything in the run directory changes
        if stored and not read_pairs(run.pairs):
            raise ValueError(f"{run.pairs}: no training pairs; the teach stage kept none")

    outputs = [run.logits_dir] if stored else []
    with stage(run, "logits", parts, [run.pairs], outputs, force=force, check=check, every_rank=True) as st:
        if st is None:
            return run.stage_entry("logits")["counts"]
        if not stored:
            why = "online" if cfg.logits.mode == "online" else "not needed (train.kd_weight=0)"
            st.counts.update(mode="online" if cfg.logits.mode == "online" else "none")
            st.say(f"[logits] {why}: nothing to store")
            return dict(st.counts)
        st.counts.update(mode="offline", **compute_teacher_logits(cfg, run, resume=st.resumed, say=st.say))
        return dict(st.counts)


def compute_teacher_logits(cfg: Config, run: RunDir, *, resume: bool, say=print) -> dict:
    from ssb.distill.loss import OutputHead, check_head, final_hidden
    from ssb.distill.pairs import encode_pairs, pad_batch, read_pairs
    from ssb.distill.store import (
        TeacherStoreWriter,
        bytes_per_token,
        draw,
        example_generator,
        sparsify,
        stored_ids,
    )
    from ssb.models import load_from_config, model_fingerprint

    lc, T = cfg.logits, cfg.train.temperature
    records = read_pairs(run.pairs)
    if not records:
        raise ValueError(f"{run.pairs}: no training pairs; the teach stage kept none")
    model, tok = load_from_config(cfg)
    head = OutputHead.of(model)
    k, samples = store_widths(lc, head.vocab_size)
    hidden_size = head.weight.shape[1]
    meta = dict(
        temperature=T,
        top_k=k,
        vocab_size=head.vocab_size,
        fingerprint=model_fingerprint(model, tok),
        model=cfg.model,
        kind=lc.store,
        hidden_size=hidden_size,
        samples=samples,
        seed=cfg.seed,
        shard_size=lc.shard_size,
    )
    # Several processes: each stores its share (`parallel.share`) in a store of its own, RUN/logits/rank-R-of-N,
    # and rank 0 takes their shards into RUN/logits at the end, and at the start any a killed launch left.
    w = parallel.current()
    main = TeacherStoreWriter(run.logits_dir, **meta, resume=resume) if w.is_main else None
    if main is not None:
        for leftover in rank_stores(run.logits_dir):
            main.absorb(leftover)
    parallel.barrier()
    done = main.done if main is not None else stored_ids(run.logits_dir)
    writer = main if w.size == 1 else TeacherStoreWriter(rank_store(run.logits_dir, w.rank, w.size), **meta)
    mine = parallel.share([r["id"] for r in records if r["id"] not in done])
    todo = [r for r in records if r["id"] in mine]
    for r in todo:
        if max(r["solution_ids"]) >= head.vocab_size:
            raise ValueError(
                f"{run.pairs}:{r['_line']}: field 'solution_ids': id {max(r['solution_ids'])} is outside "
                f"the model's vocabulary ({head.vocab_size})"
            )
    if done:
        say(f"[logits] resuming: {len(done)} examples already stored, {len(todo)} to go")
    pairs = sorted(encode_pairs(todo, tok, student=False), key=lambda p: -p.teacher_len)  # longest first: OOM early
    device = next(model.parameters()).device
    if pairs:
        check_head(model, head, torch.tensor([pairs[-1].teacher_prompt], device=device))
    what = {
        "topk": f"top-{k} of {head.vocab_size} at T={T}",
        "sampled": f"{samples} draws from {head.vocab_size} at T={T}",
        "hybrid": f"top-{k} + {samples} draws from the tail of {head.vocab_size} at T={T}",
        "hidden": f"final hidden states ({hidden_size})",
    }[lc.store]
    per_token = bytes_per_token(k, lc.store, hidden_size, head.vocab_size, samples)
    say(f"[logits] {len(pairs)} examples, {what}, {per_token} bytes/token -> {run.logits_dir}")
    t0, done_tokens = time.time(), 0
    for start in range(0, len(pairs), lc.batch_size):
        chunk = pairs[start : start + lc.batch_size]
        batch = pad_batch(
            [p.teacher_prompt + p.solution_ids for p in chunk], [len(p.teacher_prompt) for p in chunk], tok.pad_token_id
        )
        with torch.no_grad():
            hidden = final_hidden(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for b, p in enumerate(chunk):
                first = len(p.teacher_prompt) - 1
                h = hidden[b, first : first + p.solution_len]  # [L, H]: the positions predicting the solution
                if lc.store == "hidden":
                    writer.add(p.id, h)
                elif lc.store == "topk":
                    rows = [sparsify(head.logits(h[i : i + 256]), k, T) for i in range(0, len(h), 256)]
                    writer.add(p.id, type(rows[0])(*(torch.cat(parts) for parts in zip(*rows))))
                else:  # one generator per example, consumed in order: the same draws at any batch size
                    gen = example_generator(cfg.seed, p.id)
                    rows = [draw(head.logits(h[i : i + 128]), T, samples, k, gen) for i in range(0, len(h), 128)]
                    writer.add(p.id, type(rows[0])(*(torch.cat(parts) for parts in zip(*rows))))
                done_tokens += p.solution_len
        if (start // lc.batch_size) % 20 == 0 or start + lc.batch_size >= len(pairs):
            say(
                f"[logits] {min(start + lc.batch_size, len(pairs))}/{len(pairs)} examples, "
                f"{done_tokens / max(1e-9, time.time() - t0):.0f} tokens/s"
            )
    if writer is not main:
        writer.close()
    parallel.barrier()
    counts, reference = None, 0
    if main is not None:
        for share in rank_stores(run.logits_dir):
            main.absorb(share)
        counts = main.close()
        say(
            f"[logits] stored {counts['examples']} examples, {counts['tokens']} tokens, "
            f"{counts['bytes'] / 2**20:.1f} MiB ({counts['bytes_per_token']} bytes/token)"
        )
        if lc.store != "hidden" and lc.reference_pairs:
            reference = _store_reference(cfg, run, model, tok, records, main.index["fingerprint"], say)
    counts, reference = parallel.broadcast((counts, reference))
    return {
        **counts,
        "store": lc.store,
        "top_k": k if lc.store in ("topk", "hybrid") else 0,
        "samples": samples,
        "reference_pairs": reference,
        "temperature": T,
        "vocab_size": head.vocab_size,
    }


def store_widths(lc, vocab_size: int) -> tuple[int, int]:
    """(exact head k, draws per token) for logits.store, with 0 = auto filling 1,000 bytes per token."""
    from ssb.distill.store import auto_slots, auto_top_k

    if lc.store == "topk":
        return (min(lc.top_k, vocab_size) if lc.top_k else auto_top_k(vocab_size)), 0
    if lc.store == "sampled":
        return 0, lc.samples or auto_slots(vocab_size, "sampled")
    if lc.store == "hybrid":
        slots = auto_slots(vocab_size, "hybrid")
        k = min(lc.top_k, vocab_size) if lc.top_k else min(HYBRID_AUTO_HEAD, slots // 2)
        return k, lc.samples or max(1, slots - k)
    return 0, 0


def reference_ids(records: list[dict], n: int) -> list[str]:
    """The fixed subset whose exact full-vocabulary KL training logs: the first n pair ids in sorted order."""
    return sorted(r["id"] for r in records)[:n]


def _store_reference(cfg: Config, run: RunDir, model, tok, records: list[dict], fingerprint: str, say) -> int:
    """Teacher hidden states of the reference pairs, stored whole (kind hidden) in RUN/logits/reference/."""
    import shutil

    from ssb.distill.loss import final_hidden
    from ssb.distill.pairs import encode_pairs
    from ssb.distill.store import TeacherStoreWriter

    root = run.logits_dir / "reference"
    shutil.rmtree(root, ignore_errors=True)  # small: rewritten whole rather than resumed
    ids = set(reference_ids(records, cfg.logits.reference_pairs))
    head = model.get_output_embeddings().weight
    writer = TeacherStoreWriter(
        root,
        temperature=cfg.train.temperature,
        top_k=0,
        vocab_size=head.shape[0],
        fingerprint=fingerprint,
        model=cfg.model,
        kind="hidden",
        hidden_size=head.shape[1],
    )
    device = next(model.parameters()).device
    for p in encode_pairs([r for r in records if r["id"] in ids], tok, student=False):
        with torch.no_grad():
            x = torch.tensor([p.teacher_prompt + p.solution_ids], device=device)
            h = final_hidden(model, x, torch.ones_like(x))[0]
        writer.add(p.id, h[len(p.teacher_prompt) - 1 : len(p.teacher_prompt) - 1 + p.solution_len])
    counts = writer.close()
    say(f"[logits] full-distribution reference: {counts['examples']} pairs, {counts['tokens']} tokens -> {root}")
    return counts["examples"]
