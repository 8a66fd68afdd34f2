"""KV caches that grow with the tokens in flight, and the prefill / one-token decode passes that use them.

The engine runs the Hugging Face model's own modules (embedding, norms, q/k/v/o projections, MLP, rotary
embedding, lm_head; so peft LoRA layers and per-architecture details such as Qwen2's q/k/v biases or Qwen3's q/k
norms are honoured) in its own layer loop, against two caches:

* a prompt cache with one slot per prompt in flight: [layers, slots, kv_heads, longest prompt, head_dim]; the
  prompt is prefilled once and shared by all its samples. Its slot axis grows as prompts are admitted;
* a paged generation cache: the generated positions are cut into segments of SEGMENT positions, and segment j
  is a pool [layers, slots_j, kv_heads, SEGMENT, head_dim] holding that segment for the sequences that have
  reached it. A sequence takes a slot in segment j when it generates its (j * SEGMENT)-th token and gives all its
  slots back when it finishes; a pool is allocated when the first sequence reaches it, grows (x1.25) when it is
  full, and is freed when it empties. So memory follows the tokens in flight: a sequence 40 tokens long holds one
  segment, not max_new_tokens positions (measured on the benchmark workload: allocated / used KV bytes, see
  `kv_stats` and benchmarks/README.md).

Why segments rather than vLLM-style per-sequence block tables: on CPU the decode attention is bound by reading
the cache, and a block table needs a gather (a copy of every key and value read) before each matmul. Here each
segment pool is attended to in place by the queries of its sequences (one batched matmul per segment, over
contiguous keys), and the partial softmaxes (one per segment, one for the shared prompt: the "cascade" form) are
merged exactly through their log-sum-exps. A finished sequence's KV is never copied: its slots are reused.
Segments also replace the old age-ordered row chunks: each part is padded only to its own fill (<= SEGMENT).

Memory budget (`Engine(kv_budget_bytes=...)`, config key `generation_memory_mib`): the scheduler admits at most
as many sequences as could all reach max_new_tokens within the budget (`worst_case_bytes_per_sequence`), so the
cache never exceeds it and no sequence ever has to be stopped or recomputed; the reservation is a limit on
admission, not an allocation.

Precision: the projections and MLP run in the model's dtype; on CPU, rotary embedding, the KV caches and
attention are float32 even for a bf16 model (bf16 weights are for the AMX matrix units; a bf16 score matrix
would round logits of ~20 to steps of 0.125). On CUDA they follow the model's dtype, as in Hugging Face models.
"""

from __future__ import annotations

import torch

SEGMENT = 64  # generated positions per cache segment (memory granularity and attention padding bound)

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
    """Prefill/decode of a supported causal LM against the prompt cache and the paged generation cache.

    Sequences are named by row ids in [0, max_rows) and prompts by prompt slots in [0, max_slots), both chosen by
    the scheduler; `set_limits` fixes those bounds (they cap how far the caches can grow). Nothing is allocated
    until the first prefill.
    """

    def __init__(self, model, max_prompt: int, max_new: int):
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
        self.kv_dtype = torch.float32 if self.device.type == "cpu" else self.dtype  # see the module docstring
        self.kv_heads, self.heads = cfg.num_key_value_heads, cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.token_bytes = kv_token_bytes(self.lm, self.kv_dtype)
        self.max_prompt, self.max_new = max_prompt, max_new
        self.max_rows = self.max_slots = 1
        self.segment = min(SEGMENT, max_new)  # a short generation needs no longer segment
        self.segments = -(-max_new // self.segment)
        # generation cache: per segment a K and a V pool (None until a sequence reaches it); slot -> owning row
        self.seg_k: list[torch.Tensor | None] = [None] * self.segments
        self.seg_v: list[torch.Tensor | None] = [None] * self.segments
        self.seg_owner: list[list[int]] = [[] for _ in range(self.segments)]  # -1: a free slot
        self.seg_live = [0] * self.segments
        self.row_slots: dict[int, list[int]] = {}  # row -> its slot in segments 0, 1, ...
        self.pk: torch.Tensor | None = None  # [layers, slots, kv_heads, max_prompt, head_dim]
        self.pv: torch.Tensor | None = None
        self.allocated = self.peak_allocated = self.peak_used = 0

    def worst_case_bytes_per_sequence(self) -> int:
        """KV bytes one sequence can need: all its generated segments, a prompt slot of its own, and its share of
        the transient copy while a pool grows (old and new pool both exist during the copy)."""
        growth = max(self.segment, self.max_prompt)
        return self.token_bytes * (self.segments * self.segment + self.max_prompt + growth)

    def set_limits(self, max_rows: int, max_slots: int) -> None:
        self.max_rows, self.max_slots = max_rows, max_slots

    def kv_stats(self) -> dict:
        """Peak bytes allocated for KV (pools, including growth copies) and peak bytes holding live tokens' KV."""
        return {"kv_bytes_allocated": self.peak_allocated, "kv_bytes_used": self.peak_used}

    # ------------------------------------------------------------------------------------------ allocation

    def _regrow(self, k, v, capacity: int, length: int):
        """New zero-filled K and V pools of `capacity` slots holding the old pools' slots (masked cache entries are
        still multiplied by 0 in attention and must not be NaN, hence zeros)."""
        shape = (len(self.layers), capacity, self.kv_heads, length, self.head_dim)
        new_k, new_v = (torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in range(2))
        new_bytes = 2 * new_k.numel() * new_k.element_size()
        self.peak_allocated = max(self.peak_allocated, self.allocated + new_bytes)  # both exist during the copy
        self.allocated += new_bytes
        if k is not None:
            new_k[:, : k.shape[1]] = k
            new_v[:, : v.shape[1]] = v
            self.allocated -= 2 * k.numel() * k.element_size()
        return new_k, new_v

    @staticmethod
    def _capacity(current: int, need: int, limit: int) -> int:
        """Grow by a quarter (so a pool is copied O(log n) times, and is at most 25% larger than its peak use), at
        least to `need`, at most to `limit`."""
        return min(limit, max(need, current + current // 4, 8))

    def _ensure_prompt_slots(self, need: int) -> None:
        capacity = 0 if self.pk is None else self.pk.shape[1]
        if need > capacity:
            capacity = self._capacity(capacity, need, self.max_slots)
            self.pk, self.pv = self._regrow(self.pk, self.pv, capacity, self.max_prompt)

    def _reserve_segment(self, j: int, need: int) -> None:
        capacity = len(self.seg_owner[j])
        if need > capacity:
            capacity = self._capacity(capacity, need, self.max_rows)
            self.seg_k[j], self.seg_v[j] = self._regrow(self.seg_k[j], self.seg_v[j], capacity, self.segment)
            self.seg_owner[j].extend([-1] * (capacity - len(self.seg_owner[j])))

    def _take_segment_slot(self, j: int, row: int) -> None:
        """Give `row` a slot in segment j (it is about to write its first position there)."""
        self._reserve_segment(j, self.seg_live[j] + 1)
        owner = self.seg_owner[j]
        slot = owner.index(-1)
        owner[slot] = row
        self.seg_live[j] += 1
        self.row_slots.setdefault(row, []).append(slot)

    def release(self, row: int) -> None:
        """A finished sequence gives its segment slots back; a pool nobody uses any more is freed."""
        for j, slot in enumerate(self.row_slots.pop(row, [])):
            self.seg_owner[j][slot] = -1
            self.seg_live[j] -= 1
            if self.seg_live[j] == 0:
                self.allocated -= 2 * self.seg_k[j].numel() * self.seg_k[j].element_size()
                self.seg_k[j] = self.seg_v[j] = None
                self.seg_owner[j] = []

    # ------------------------------------------------------------------------------------------ forward

    def _forward(self, ids, positions, attend):
        """ids/positions: [B, T]; attend(layer_idx, attn_module, q, k, v) -> [B, T, heads * hd].
        Returns final-normed hidden states [B, T, D]."""
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
            o = attend(i, a, _rope(q.to(kv), cos, sin), _rope(k.to(kv), cos, sin), v.to(kv))
            h = h + a.o_proj(o.to(h.dtype))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run the prompts (right-padded into one batch) and store prompt i's KV in prompt slot slots[i].

        Returns the next-token logits at each prompt's last position: [P, V].
        """
        self._ensure_prompt_slots(max(slots) + 1)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        p, t = len(prompts), int(lengths.max())
        ids = torch.zeros(p, t, dtype=torch.long, device=self.device)
        for i, seq in enumerate(prompts):
            ids[i, : len(seq)] = torch.tensor(seq, device=self.device)
        dst = torch.tensor(slots, device=self.device)
        group = self.heads // self.kv_heads

        def attend(i, a, q, k, v):  # q: [P, T, H, hd], k/v: [P, T, KV, hd]
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [P, KV, T, hd]
            self.pk[i, dst, :, :t] = k
            self.pv[i, dst, :, :t] = v
            # causal attention; padding only follows a prompt, so its real positions never see it
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.repeat_interleave(group, 1),
                v.repeat_interleave(group, 1),
                is_causal=True,
                scale=a.scaling,
            )  # [P, H, T, hd]
            return o.transpose(1, 2).reshape(p, t, -1)

        positions = torch.arange(t, device=self.device)[None].expand(p, t)
        h = self._forward(ids, positions, attend)
        return self.head(h[torch.arange(p, device=self.device), lengths - 1])

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
        r, (s, n) = len(rows), members.shape
        kvh, g, hd, dev = self.kv_heads, self.heads // self.kv_heads, self.head_dim, self.device
        entering: dict[int, list[int]] = {}  # segment -> rows writing its first position now
        for row, step in zip(rows, steps):
            if step % self.segment == 0:
                entering.setdefault(step // self.segment, []).append(row)
        for j, new_rows in entering.items():
            self._reserve_segment(j, self.seg_live[j] + len(new_rows))  # one growth for all of them
            for row in new_rows:
                self._take_segment_slot(j, row)
        index_of = {row: k for k, row in enumerate(rows)}
        used = sum(steps) + r + int(prompt_lens.sum())
        self.peak_used = max(self.peak_used, used * self.token_bytes)
        # where each sequence writes this step's KV: (segment slots, offsets, batch indices) per segment
        writes: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for k, (row, step) in enumerate(zip(rows, steps)):
            slot_list, offsets, batch = writes.setdefault(step // self.segment, ([], [], []))
            slot_list.append(self.row_slots[row][step // self.segment])
            offsets.append(step % self.segment)
            batch.append(k)
        writes_t = [(j, *(torch.tensor(x, device=dev) for x in w)) for j, w in writes.items()]
        # the attention parts: per segment, its slots [0, hi) as batch indices (R = none) and their mask
        neg = torch.finfo(self.kv_dtype).min  # finite: fully masked (free) slots stay NaN-free
        step_of = torch.tensor(steps + [-1], device=dev)  # index R: none
        longest = max(steps)
        parts = []
        for j in range(longest // self.segment + 1):
            owner = self.seg_owner[j]
            hi = max(k for k, o in enumerate(owner) if o >= 0) + 1
            idx = torch.tensor([index_of[o] if o >= 0 else r for o in owner[:hi]], device=dev)
            fill = min(self.segment, longest - j * self.segment + 1)
            beyond = torch.arange(fill, device=dev) > (step_of[idx] - j * self.segment)[:, None]
            mask = torch.zeros(hi, 1, 1, fill, device=dev).masked_fill_(beyond[:, None, None], neg)
            parts.append((j, hi, idx, fill, mask))
        lp = int(prompt_lens.max())
        ar_p = torch.arange(lp, device=dev)
        mask_p = torch.zeros(s, 1, 1, lp, device=dev).masked_fill_((ar_p >= prompt_lens[:, None])[:, None, None], neg)
        gather = members.view(-1)

        def attend(i, a, q, k, v):  # q: [R, 1, H, hd], k/v: [R, 1, KV, hd]
            for j, slot_t, offset_t, batch_t in writes_t:
                self.seg_k[j][i, slot_t, :, offset_t] = k[batch_t, 0]
                self.seg_v[j][i, slot_t, :, offset_t] = v[batch_t, 0]
            q = torch.cat([q.view(r, kvh, g, hd), q.new_zeros(1, kvh, g, hd)])  # the query heads of each kv head
            # every part's output and log-sum-exp per sequence (index R collects the padding): [R+1, parts, ...]
            o_all = q.new_zeros(r + 1, len(parts) + 1, kvh, g, hd)
            lse_all = q.new_full((r + 1, len(parts) + 1, kvh, g, 1), float("-inf"))
            for p, (j, hi, idx, fill, mask) in enumerate(parts):
                kj, vj = self.seg_k[j][i, :hi, :, :fill], self.seg_v[j][i, :hi, :, :fill]
                o_all[idx, p], lse_all[idx, p] = _attention(q[idx], kj, vj, mask, a.scaling)
            # shared prompt: all samples' queries of a prompt slot against its keys at once: [S, KV, n*G, .]
            qp = q[gather].view(s, n, kvh, g, hd).transpose(1, 2).reshape(s, kvh, n * g, hd)
            op, lse_p = _attention(qp, self.pk[i, :s, :, :lp], self.pv[i, :s, :, :lp], mask_p, a.scaling)

            def to_rows(x):  # [S, KV, n*G, c] -> [R, KV, G, c]
                return x.view(s, kvh, n, g, -1).transpose(1, 2).reshape(s * n, kvh, g, -1)[member_of]

            o_all[:r, -1], lse_all[:r, -1] = to_rows(op), to_rows(lse_p)
            lse = torch.logsumexp(lse_all[:r], 1, keepdim=True)  # exact merge of the softmax pieces
            o = (o_all[:r] * torch.exp(lse_all[:r] - lse)).sum(1)  # [R, KV, G, hd]
            return o.to(v.dtype).view(r, 1, -1)

        ids = torch.tensor(tokens, device=dev)[:, None]
        positions = (torch.tensor(prompt_len, device=dev) + torch.tensor(steps, device=dev))[:, None]
        h = self._forward(ids, positions, attend)
        return self.head(h[:, 0])

    def move_prompts(self, src: list[int], dst: list[int]) -> None:
        """Copy prompt-cache slots src -> dst."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.pk[:, d] = self.pk[:, s]
        self.pv[:, d] = self.pv[:, s]
