"""KV caches that grow with the tokens in flight, and the prefill / one-token decode passes that use them.

The engine runs the Hugging Face model's own modules (embedding, norms, q/k/v/o projections, MLP, rotary
embedding, lm_head; so peft LoRA layers and per-architecture details such as Qwen2's q/k/v biases or Qwen3's q/k
norms are honoured) in its own layer loop, against two caches:

* a paged prompt cache: a prompt's positions are cut into segments of PROMPT_SEGMENT positions, held in pools
  like the generation cache's (below), one slot per prompt in flight in each segment it reaches; the prompt is
  prefilled once and shared by all its samples, and its slots are given back when its last sample finishes. So
  a call whose prompts range from 200 to 1,200 tokens (teach's hinted prompts) holds each prompt's own length
  rounded up to a segment, not the longest prompt's length in every slot;
* a paged generation cache: the generated positions are cut into segments of SEGMENT positions, and segment j
  is a pool [layers, slots_j, kv_heads, SEGMENT, head_dim] holding that segment for the sequences that have
  reached it. A sequence takes a slot in segment j when it generates its (j * SEGMENT)-th token and gives all its
  slots back when it finishes; a pool exists from the first sequence's arrival until it empties, and holds
  resident memory only for the slots used (`ssb.engine.pools`). So memory follows the tokens in flight: a sequence 40
  tokens long holds one segment, not max_new_tokens positions (measured on the benchmark workload: allocated /
  used KV bytes, see `kv_stats` and benchmarks/README.md).

Why segments rather than vLLM-style per-sequence block tables: on CPU the decode attention is bound by reading
the cache, and a block table needs a gather (a copy of every key and value read) before each matmul. Here each
segment pool is attended to in place by the queries of its sequences (one batched matmul per segment, over
contiguous keys), and the partial softmaxes (one per generated segment, one per prompt segment attended by all
the prompt's samples at once: the "cascade" form) are merged exactly through their log-sum-exps. A finished
sequence's KV is never copied: its slots are reused. Each part is padded only to its own fill (<= a segment).
On CPU that torch path is replaced, where it builds, by a fused kernel (`ssb.engine.attention_kernel`) that reads
the same segments in place with one online softmax per (sequence, kv head); `_torch_attend` stays for other
devices, for shapes outside the kernel's limits and for CPUs without a compiler.

Memory budget (`Engine(kv_budget_bytes=...)`, config key `generation_memory_mib`): the scheduler admits at most
as many sequences as could all reach max_new_tokens within the budget (`worst_case_bytes_per_sequence`), so the
cache never exceeds it and no sequence ever has to be stopped or recomputed; the reservation is a limit on
admission, not an allocation.

Precision: the projections, MLP and KV caches are in the model's dtype (as in Hugging Face models); softmax,
log-sum-exps and the merge of the attention parts are float32. A bf16 score matrix rounds logits near 20 to
steps of 0.125, so on CPU the caches were float32 until 2026-12-05; measured since (benchmarks/precision.py,
SmolLM2-135M, 768 teacher-forced decode positions): KL from the fp32 model 0.000789 nats/token with bf16 caches
against 0.000727 with float32 ones and 0.000783 for Hugging Face's bf16 model, top-1 agreement 98.57% with
either cache; bf16 caches halve the KV memory and the bytes each decode step reads.
"""

from __future__ import annotations

import torch

from ssb.engine import attention_kernel
from ssb.engine.pools import KVMeter, SegmentPools

SEGMENT = 64  # generated positions per cache segment (memory granularity and attention padding bound)
# prompt positions per prompt-cache segment: longer than SEGMENT because a prompt is attended to by all its
# samples at once, and fewer parts mean fewer small matmuls per layer; at most half of it is padding per prompt
PROMPT_SEGMENT = 128

# Decoder-only architectures whose layer is exactly: h += o_proj(attn(norm(h))); h += mlp(norm(h)).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """A model type this module's layer loop does not implement; `model` is the unwrapped causal LM."""

    def __init__(self, message: str, model):
        super().__init__(message)
        self.model = model


def unwrap_causal_lm(model):
    """The Hugging Face *ForCausalLM inside `model` (a peft PeftModel is unwrapped, its LoRA layers stay active)."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional at run time
        PeftModel = ()
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"ssb's generation engine implements model types {', '.join(SUPPORTED_MODEL_TYPES)}, not "
            f"{model_type!r} ({type(model).__name__})",
            model,
        )
    return model


def _rope(x, cos, sin):
    """x: [B, T, heads, hd], cos/sin: [B, T, hd] -> rotated x (HF's rotate-half convention)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _attention(q, k, v, mask, scale):
    """Softmax attention returning the output and its log-sum-exp, so partial attentions can be merged.

    q: [B, h, Lq, hd], k/v: [B, h, Lk, hd], mask: additive float32 [B, 1, 1, Lk].
    Returns o: [B, h, Lq, hd] (float32) and lse: [B, h, Lq, 1] (float32).
    Plain matmuls and in-place element-wise ops: for decode (Lq = a few query heads) this beat the fused CPU
    flash kernel (113 vs 126 ms per 30 layers on 1 thread, 64 vs 76 on 2), and unlike that kernel its result
    does not depend on the thread count (see generation._ThreadTuner).
    """
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(mask)  # [B, h, Lq, Lk]
    m = s.amax(-1, keepdim=True)
    e = s.sub_(m).exp_()
    total = e.sum(-1, keepdim=True)
    return torch.matmul(e.to(v.dtype), v).float().div_(total), m.add_(total.log_())


def kv_token_bytes(lm, kv_dtype) -> int:
    """Bytes of keys + values one token adds to the cache, over all layers."""
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.empty(0, dtype=kv_dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


class SlotModel:
    """Prefill/decode of a supported causal LM against the paged prompt cache and the paged generation cache.

    Sequences are named by row ids in [0, max_rows) and prompts by prompt slots in [0, max_slots), both chosen by
    the scheduler; `set_limits` fixes those bounds (they cap how far the pools can grow). Nothing is allocated
    until the first prefill. kv_dtype: the caches' dtype (None: the model's; benchmarks/precision.py compares).
    """

    def __init__(self, model, max_prompt: int, max_new: int, kv_dtype: torch.dtype | None = None):
        self.lm = unwrap_causal_lm(model)
        cfg = self.lm.config
        max_len = max_prompt + max_new
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
            raise ValueError(
                f"sequences of up to {max_len} tokens exceed the model's sliding window ({window}), "
                "which this engine does not implement"
            )
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt + max_new_tokens = {max_len} exceeds max_position_embeddings ({cfg.max_position_embeddings})"
            )
        body = self.lm.model
        self.embed, self.layers, self.norm, self.rotary = body.embed_tokens, body.layers, body.norm, body.rotary_emb
        self.head = self.lm.lm_head
        weight = self.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.kv_dtype = kv_dtype or self.dtype  # see the module docstring, "Precision"
        self.kv_heads, self.heads = cfg.num_key_value_heads, cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.token_bytes = kv_token_bytes(self.lm, self.kv_dtype)
        self.max_prompt, self.max_new = max_prompt, max_new
        self.max_rows = self.max_slots = 1
        self.segment = min(SEGMENT, max_new)  # a short generation needs no longer segment
        self.segments = -(-max_new // self.segment)
        self.prompt_segment = min(PROMPT_SEGMENT, max_prompt)
        self.meter = KVMeter()  # both caches' pools: allocated bytes and their peak
        shape = (len(self.layers), self.kv_heads, self.head_dim)
        # generation cache: owners are rows; prompt cache: owners are prompt slots
        self.gen = SegmentPools(self.segments, self.segment, shape, self.kv_dtype, self.device, self.meter)
        prompt_segments = -(-max_prompt // self.prompt_segment)
        self.prompt = SegmentPools(prompt_segments, self.prompt_segment, shape, self.kv_dtype, self.device, self.meter)
        self.peak_used = 0
        # decode attention: the fused kernel on CPU where it builds, else torch ops (ssb.engine.attention_kernel)
        self.kernel = attention_kernel.for_model(self.device, self.heads, self.kv_heads, self.head_dim)

    def worst_case_bytes_per_sequence(self) -> int:
        """KV bytes one sequence can need: all its generated segments, all segments of a prompt of its own, and its
        share of the transient copy while a pool grows (old and new pool both exist during the copy)."""
        growth = max(self.segment, self.prompt_segment)
        prompt = self.prompt.segments * self.prompt_segment
        return self.token_bytes * (self.segments * self.segment + prompt + growth)

    def set_limits(self, max_rows: int, max_slots: int) -> None:
        self.max_rows, self.max_slots = max_rows, max_slots
        self.gen.limit, self.prompt.limit = max_rows, max_slots

    def kv_stats(self) -> dict:
        """Peak bytes allocated for KV (pools, including growth copies) and peak bytes holding live tokens' KV."""
        return {"kv_bytes_allocated": self.meter.peak_allocated, "kv_bytes_used": self.peak_used}

    def release(self, row: int) -> None:
        """A finished sequence gives its generation-cache slots back."""
        self.gen.release(row)

    def release_prompt(self, slot: int) -> None:
        """A prompt whose samples all finished gives its prompt-cache slots back."""
        self.prompt.release(slot)

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, ids, positions, attend):
        """ids/positions: [B, T]; attend(layer_idx, attn_module, q, k, v, cos, sin) -> [B, T, heads * hd], with q
        and k before the rotary embedding (cos/sin: [B, T, hd]), all in the KV dtype. Returns final-normed hidden
        states [B, T, D]."""
        h = self.embed(ids)
        kv = self.kv_dtype
        cos, sin = self.rotary(h.to(kv), positions)  # rotary computes in fp32 and casts to its input's dtype
        b, t = ids.shape
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(b, t, self.heads, self.head_dim)
            k = a.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
            v = a.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
            if hasattr(a, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
                q, k = a.q_norm(q), a.k_norm(k)
            o = attend(i, a, q.to(kv), k.to(kv), v.to(kv), cos, sin)
            h = h + a.o_proj(o.to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run each prompt and store prompt i's KV under prompt slot slots[i], one prompt-cache segment per
        PROMPT_SEGMENT positions it has. Returns the next-token logits at each prompt's last position: [P, V].

        One prompt at a time, at its own length: no padding, and a prompt's KV does not depend on which prompts
        were admitted with it (bf16 matmuls and attention on CPU round differently for different shapes: on the
        tiny test model a short prompt's logits changed when it was prefilled padded beside longer prompts).
        """
        return torch.cat([self._prefill_one(seq, slot) for seq, slot in zip(prompts, slots)])

    def _prefill_one(self, seq: list[int], slot: int) -> torch.Tensor:
        """`prefill` of one prompt into prompt slot `slot`; returns its next-token logits [1, V]."""
        t, ps = len(seq), self.prompt_segment
        self.prompt.release(slot)  # a reused slot starts empty
        # per segment: its pool slot for this prompt and the positions to copy
        writes = [(j, self.prompt.take(j, slot), min(ps, t - j * ps)) for j in range(-(-t // ps))]
        group = self.heads // self.kv_heads

        def attend(i, a, q, k, v, cos, sin):  # q: [1, T, H, hd], k/v: [1, T, KV, hd]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [1, KV, T, hd]
            for j, pool_slot, width in writes:
                self.prompt.k[j][i, pool_slot, :, :width] = k[0, :, j * ps : j * ps + width]
                self.prompt.v[j][i, pool_slot, :, :width] = v[0, :, j * ps : j * ps + width]
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.repeat_interleave(group, 1),
                v.repeat_interleave(group, 1),
                is_causal=True,
                scale=a.scaling,
            )  # [1, H, T, hd]
            return o.transpose(1, 2).reshape(1, t, -1)

        ids = torch.tensor([seq], device=self.device)
        h = self._forward(ids, torch.arange(t, device=self.device)[None], attend)
        return self.head(h[:, -1])

    def decode(
        self,
        rows: list[int],
        tokens: list[int],
        steps: list[int],
        prompt_len: list[int],
        members: torch.Tensor,
        member_of: torch.Tensor,
        prompt_lens: torch.Tensor,
    ) -> torch.Tensor:
        """One token for each sequence in `rows` (R of them); returns next-token logits [R, V].

        tokens, steps, prompt_len: per sequence, the token fed, its index among the sequence's generated tokens
        (its position in the generation cache) and the prompt length (its position is prompt_len + step).
        members: [S, n] indices into `rows` of each prompt slot [0, S)'s sequences, padded with R (none);
        member_of: [R] each sequence's flat index into members.view(-1); prompt_lens: [S] (0 for a free slot).
        """
        r, n, dev = len(rows), members.shape[1], self.device
        self.gen.compact()  # between steps: the slots freed by the sequences that finished go back (pools.py)
        self.prompt.compact()
        entering: dict[int, list[int]] = {}  # segment -> rows writing its first position now
        for row, step in zip(rows, steps):
            if step % self.segment == 0:
                entering.setdefault(step // self.segment, []).append(row)
        for j, new_rows in entering.items():
            self.gen.reserve(j, self.gen.live[j] + len(new_rows))  # one growth for all of them
            for row in new_rows:
                self.gen.take(j, row)
        used = sum(steps) + r + int(prompt_lens.sum())
        self.peak_used = max(self.peak_used, used * self.token_bytes)
        if self.kernel is not None:
            attend = self._kernel_attend(rows, steps, prompt_len, member_of // n)
        else:
            attend = self._torch_attend(rows, steps, members, member_of, prompt_lens)
        ids = torch.tensor(tokens, device=dev)[:, None]
        positions = (torch.tensor(prompt_len, device=dev) + torch.tensor(steps, device=dev))[:, None]
        h = self._forward(ids, positions, attend)
        return self.head(h[:, 0])

    def _kernel_attend(self, rows, steps, prompt_len, slot_of):
        """The decode `attend` of the fused kernel (ssb.engine.attention_kernel); slot_of: [R] prompt slots."""
        r, kvh, g, hd = len(rows), self.kv_heads, self.heads // self.kv_heads, self.head_dim

        def table(slot_lists, width):  # [R, width]: each row's slot per segment, 0 past its own (never read)
            return torch.tensor([s + [0] * (width - len(s)) for s in slot_lists], dtype=torch.long)

        gen_slot = table([self.gen.slots_of[row] for row in rows], self.gen.segments)
        prompt_slot = table([self.prompt.slots_of[p] for p in slot_of.tolist()], self.prompt.segments)
        gen_len, prompt_len_t = torch.tensor(steps) + 1, torch.tensor(prompt_len)
        order = torch.argsort(slot_of, stable=True)  # a prompt's samples together: its segments stay in cache
        empty = torch.empty(0, dtype=self.kv_dtype)  # a segment no row reaches: never read

        def pools(xs):
            return [x if x is not None else empty for x in xs]

        gen_k, gen_v, prompt_k, prompt_v = map(pools, (self.gen.k, self.gen.v, self.prompt.k, self.prompt.v))

        def attend(i, a, q, k, v, cos, sin):  # q: [R, 1, H, hd], k/v: [R, 1, KV, hd], cos/sin: [R, 1, hd]
            o = self.kernel.decode_attention(
                q.reshape(r, kvh, g, hd).contiguous(),
                k.reshape(r, kvh, hd).contiguous(),
                v.reshape(r, kvh, hd).contiguous(),
                cos.reshape(r, hd).contiguous(),
                sin.reshape(r, hd).contiguous(),
                gen_k, gen_v, gen_slot, gen_len,
                prompt_k, prompt_v, prompt_slot, prompt_len_t,
                order, i, a.scaling,
            )  # fmt: skip
            return o.view(r, 1, -1)

        return attend

    def _torch_attend(self, rows, steps, members, member_of, prompt_lens):
        """The decode `attend` in torch ops: per cache part a batched attention, merged through log-sum-exps."""
        r, (s, n) = len(rows), members.shape
        index_of = {row: k for k, row in enumerate(rows)}
        kvh, g, hd, dev = self.kv_heads, self.heads // self.kv_heads, self.head_dim, self.device
        # where each sequence writes this step's KV: (segment slots, offsets, batch indices) per segment
        writes: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for k, (row, step) in enumerate(zip(rows, steps)):
            slot_list, offsets, batch = writes.setdefault(step // self.segment, ([], [], []))
            slot_list.append(self.gen.slots_of[row][step // self.segment])
            offsets.append(step % self.segment)
            batch.append(k)
        writes_t = [(j, *(torch.tensor(x, device=dev) for x in w)) for j, w in writes.items()]
        # the attention parts: per segment, its slots [0, hi) as batch indices (R = none) and their mask
        neg = torch.finfo(self.kv_dtype).min  # finite: fully masked (free) slots stay NaN-free
        step_of = torch.tensor(steps + [-1], device=dev)  # index R: none
        parts = []
        for j in range(max(steps) // self.segment + 1):
            hi = self.gen.used(j)
            idx = torch.tensor([index_of[o] if o >= 0 else r for o in self.gen.owner[j][:hi]], device=dev)
            fill = min(self.segment, max(steps) - j * self.segment + 1)
            beyond = torch.arange(fill, device=dev) > (step_of[idx] - j * self.segment)[:, None]
            mask = torch.zeros(hi, 1, 1, fill, device=dev).masked_fill_(beyond[:, None, None], neg)
            parts.append((j, hi, idx, fill, mask))
        # the shared prompt's parts: per prompt segment, its slots as prompt-slot indices (S = none) and their mask
        ps, lp = self.prompt_segment, int(prompt_lens.max())
        len_of = torch.cat([prompt_lens, prompt_lens.new_zeros(1)])  # index S: none
        prompt_parts = []
        for j in range(-(-lp // ps)):
            hi = self.prompt.used(j)
            idx = torch.tensor([o if 0 <= o < s else s for o in self.prompt.owner[j][:hi]], device=dev)
            fill = min(ps, lp - j * ps)
            beyond = torch.arange(fill, device=dev) >= (len_of[idx] - j * ps)[:, None]
            mask = torch.zeros(hi, 1, 1, fill, device=dev).masked_fill_(beyond[:, None, None], neg)
            prompt_parts.append((j, hi, idx, fill, mask))
        gather = members.view(-1)

        def attend(i, a, q, k, v, cos, sin):  # q: [R, 1, H, hd], k/v: [R, 1, KV, hd]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            for j, slot_t, offset_t, batch_t in writes_t:
                self.gen.k[j][i, slot_t, :, offset_t] = k[batch_t, 0]
                self.gen.v[j][i, slot_t, :, offset_t] = v[batch_t, 0]
            q = torch.cat([q.view(r, kvh, g, hd), q.new_zeros(1, kvh, g, hd)])  # the query heads of each kv head
            # every part's output and log-sum-exp per sequence (index R collects the padding): [R+1, parts, ...]
            # float32 whatever the KV dtype: bf16 rounds log-sum-exps near 10 to steps of 1/16, which would weigh
            # the parts up to 3% off
            o_all = q.new_zeros(r + 1, len(parts) + 1, kvh, g, hd, dtype=torch.float32)
            lse_all = q.new_full((r + 1, len(parts) + 1, kvh, g, 1), float("-inf"), dtype=torch.float32)
            for p, (j, hi, idx, fill, mask) in enumerate(parts):
                kj, vj = self.gen.k[j][i, :hi, :, :fill], self.gen.v[j][i, :hi, :, :fill]
                o_all[idx, p], lse_all[idx, p] = _attention(q[idx], kj, vj, mask, a.scaling)
            # shared prompt: all samples' queries of a prompt slot against its keys at once: [S, KV, n*G, .]
            qp = q[gather].view(s, n, kvh, g, hd).transpose(1, 2).reshape(s, kvh, n * g, hd)
            op, lse_p = _merged(qp, self.prompt.k, self.prompt.v, i, prompt_parts, a.scaling)

            def to_rows(x):  # [S, KV, n*G, c] -> [R, KV, G, c]
                return x.view(s, kvh, n, g, -1).transpose(1, 2).reshape(s * n, kvh, g, -1)[member_of]

            o_all[:r, -1], lse_all[:r, -1] = to_rows(op), to_rows(lse_p)
            lse = torch.logsumexp(lse_all[:r], 1, keepdim=True)  # exact merge of the softmax pieces
            o = (o_all[:r] * torch.exp(lse_all[:r] - lse)).sum(1)  # [R, KV, G, hd]
            return o.to(v.dtype).view(r, 1, -1)

        return attend

    def move_prompts(self, src: list[int], dst: list[int]) -> None:
        """Prompt slots src are renamed dst (free slots); their KV stays in place."""
        for a, b in zip(src, dst):
            self.prompt.relabel(a, b)


def _merged(q, pool_k, pool_v, layer: int, parts, scale):
    """Attention of q [S, KV, Q, hd] (one row per prompt slot) over the prompt-cache segments in `parts` (per
    segment: j, used pool slots hi, their prompt-slot index idx [hi] (S = none), fill, mask [hi, 1, 1, fill]),
    merged exactly through the log-sum-exps. Returns o [S, KV, Q, hd] and lse [S, KV, Q, 1] (float32)."""
    s = q.shape[0]
    if len(parts) == 1:  # one segment (every prompt up to PROMPT_SEGMENT tokens): no merge needed
        j, hi, idx, fill, mask = parts[0]
        o_part, lse_part = _attention(
            q[idx.clamp(max=s - 1)], pool_k[j][layer, :hi, :, :fill], pool_v[j][layer, :hi, :, :fill], mask, scale
        )
        o, lse = (
            o_part.new_zeros(s + 1, *o_part.shape[1:]),
            lse_part.new_full((s + 1, *lse_part.shape[1:]), float("-inf")),
        )
        o[idx], lse[idx] = o_part, lse_part
        return o[:s], lse[:s]
    qz = torch.cat([q, q.new_zeros(1, *q.shape[1:])])  # index S: none
    o_all = q.new_zeros(s + 1, len(parts), *q.shape[1:], dtype=torch.float32)
    lse_all = q.new_full((s + 1, len(parts), *q.shape[1:-1], 1), float("-inf"), dtype=torch.float32)
    for p, (j, hi, idx, fill, mask) in enumerate(parts):
        kj, vj = pool_k[j][layer, :hi, :, :fill], pool_v[j][layer, :hi, :, :fill]
        o_all[idx, p], lse_all[idx, p] = _attention(qz[idx], kj, vj, mask, scale)
    lse = torch.logsumexp(lse_all[:s], 1, keepdim=True)
    return (o_all[:s] * torch.exp(lse_all[:s] - lse)).sum(1), lse[:, 0]
