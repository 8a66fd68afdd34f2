"""Token sampling for the generation engine: temperature / top-k / top-p with externally supplied uniforms.

Each sequence owns a seeded stream of uniform numbers (one per generated token, see `sequence_uniforms`), and a
token is drawn by inverting the CDF of the filtered distribution at that uniform. A sequence's samples therefore
depend only on (seed, prompt, sample index), not on which other sequences share its batch or on scheduling order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def sequence_uniforms(seed: int, prompt_ids: list[int], sample_index: int, length: int) -> torch.Tensor:
    """`length` uniforms in [0, 1) for sample `sample_index` of the prompt `prompt_ids` under `seed`.  # [length]

    The stream is keyed on the prompt's token ids (not its position in the call), so re-running a subset of
    prompts (e.g. resuming after a kill) reproduces exactly the same samples.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(int(sample_index).to_bytes(8, "little", signed=False))
    h.update(torch.tensor(prompt_ids, dtype=torch.int64).numpy().tobytes())
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(h.digest(), "little") & ((1 << 63) - 1))
    return torch.rand(length, generator=gen, dtype=torch.float64)


def check_request(n: int, params: SamplingParams) -> None:
    """What every generator checks before it starts: at least one sample, one new token, valid sampling."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    check_sampling(params.temperature, params.top_k, params.top_p)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"invalid sampling parameters: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
            f"top_p={top_p} (in (0, 1])"
        )


def sample_next(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Pick the next token for each row.

    logits: [B, V] (any float dtype; computed in float32); uniforms: [B] in [0, 1) (ignored when greedy).
    Returns token ids [B] (int64). temperature 0 => argmax (first index on ties, like HF greedy search).
    The filters follow HF's order and semantics: divide by temperature, keep the top_k logits, then keep the
    smallest set of most likely tokens whose probability mass reaches top_p (always at least one token).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        # top-k commutes with dividing by a positive temperature, and with the exact cast to float32, so only the
        # k survivors are cast and scaled (casting all [B, V] bf16 logits first took about as long as the top-k)
        scores, index = torch.topk(logits, top_k, dim=-1)  # [B, k], sorted descending
        scores = scores.float()
        probs = torch.softmax(scores / temperature, dim=-1)  # renormalised over the top k, as HF's top-p sees
    elif top_p < 1.0:
        full = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
        # the nucleus is a prefix of the sorted distribution: take the top k (growing k until every row's
        # nucleus fits) instead of sorting the whole vocabulary
        k = min(64, vocab)
        while True:
            probs, index = torch.topk(full, k, dim=-1)  # [B, k], sorted descending
            if k == vocab or bool((probs.cumsum(-1)[:, -1] >= top_p).all()):
                break
            k = min(8 * k, vocab)
    else:
        return _inverse_cdf(torch.softmax(logits.float() / temperature, dim=-1), uniforms)
    if top_p < 1.0:
        # sorted descending: drop a token when the mass before it already reaches top_p
        before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    return index.gather(-1, _inverse_cdf(probs, uniforms)[:, None]).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i] per row (probs: [B, N], need not sum to 1) -> [B].

    Two levels (block sums, then one block) keep the float64 cumulative sums short for a large N.
    A zero-probability entry is never chosen: its cdf step is empty.
    """
    rows, n = probs.shape
    block = min(block, n)
    blocks = torch.nn.functional.pad(probs, (0, (-n) % block)).view(rows, -1, block)  # [B, nb, block]
    block_mass = blocks.sum(-1, dtype=torch.float64)  # [B, nb]
    block_cdf = block_mass.cumsum(-1)  # [B, nb]
    total = block_cdf[:, -1:]  # [B, 1]
    target = uniforms.to(device=probs.device, dtype=torch.float64).unsqueeze(-1) * total  # [B, 1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))  # strictly below total
    b = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_cdf.shape[-1] - 1)  # [B, 1]
    before = (block_cdf.gather(-1, b) - block_mass.gather(-1, b)).squeeze(-1)  # [B] mass before block b
    inner = blocks[torch.arange(rows, device=probs.device), b.squeeze(-1)].double().cumsum(-1)  # [B, block]
    i = torch.searchsorted(inner, (target.squeeze(-1) - before).unsqueeze(-1), right=True)  # [B, 1]
    return (b * block + i.clamp_(max=block - 1)).squeeze(-1).clamp_(max=n - 1)
