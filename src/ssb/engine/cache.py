"""Static-KV-cache forward passes for the generation engine: prompt prefill and one-token decode steps.

The engine runs the Hugging Face model's own modules (embedding, norms, q/k/v/o projections, MLP, rotary
embedding, lm_head; so peft LoRA layers and per-architecture details such as Qwen2's q/k/v biases or Qwen3's q/k
norms are honoured) in its own layer loop, against two preallocated caches:

* a prompt cache with one slot per prompt in flight: [layers, prompt_slots, kv_heads, max_prompt, head_dim];
  the prompt is prefilled once and shared by all its samples;
* a generation cache with one row per sequence in flight: [layers, rows, kv_heads, max_new_tokens, head_dim].
  Rows are kept in age order, so the generated-token attention is done in chunks of rows of similar length
  instead of padding every row to the longest one.

Decode attention is split in two (the "cascade" form): all samples of a prompt attend to the shared prompt keys
in one kernel call (reading them once, not once per sample), each row attends to its own generated keys, and the
two softmax pieces are merged exactly through their log-sum-exps. This cuts the KV memory traffic (the main
non-matmul cost on CPU) and the padding: each part is padded only to its own live maximum.

Precision: the projections and MLP run in the model's dtype; on CPU, rotary embedding, the KV caches and
attention are float32 even for a bf16 model (bf16 weights are for the AMX matrix units; a bf16 score matrix
would round logits of ~20 to steps of 0.125). On CUDA they follow the model's dtype, as in Hugging Face models.
"""

from __future__ import annotations

import torch

# Decoder-only architectures whose layer is exactly: h += o_proj(attn(norm(h))); h += mlp(norm(h)).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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
        raise ValueError(
            f"generation engine supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__})"
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


class SlotModel:
    """Prefill/decode of a supported causal LM against the prompt and generation caches."""

    def __init__(self, model, rows: int, prompt_slots: int, max_prompt: int, max_new: int):
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
        shape_p = (len(self.layers), prompt_slots, self.kv_heads, max_prompt, self.head_dim)
        shape_g = (len(self.layers), rows, self.kv_heads, max_new, self.head_dim)
        # zero-filled: masked cache entries are still multiplied by 0 in attention and must not be NaN
        self.pk, self.pv = (torch.zeros(shape_p, dtype=self.kv_dtype, device=self.device) for _ in range(2))
        self.gk, self.gv = (torch.zeros(shape_g, dtype=self.kv_dtype, device=self.device) for _ in range(2))

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
        lo: int,
        tokens: torch.Tensor,
        step: torch.Tensor,
        prompt_len: torch.Tensor,
        members: torch.Tensor,
        member_of: torch.Tensor,
        prompt_lens: torch.Tensor,
        chunks: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """One token for each of generation-cache rows [lo, lo + R).

        tokens, step, prompt_len, member_of: [R] -- the token fed, its index among the row's generated tokens
        (its position in the generation cache), the row's prompt length (its position is prompt_len + step),
        and the row's index into members.view(-1). members: [S, n] rows (relative to lo) of each prompt slot
        [0, S), padded with R (none); prompt_lens: [S]. chunks: (first, end, length) row ranges covering [0, R)
        whose generated-token attention spans `length` positions (rows are kept in age order, so a chunk of
        similar ages pads little). Returns next-token logits [R, V].
        """
        r, (s, n) = tokens.shape[0], members.shape
        kvh, g, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        lg, lp = max(c[2] for c in chunks), int(prompt_lens.max())
        neg = torch.finfo(self.kv_dtype).min  # finite in the cache dtype: fully masked dummy rows stay NaN-free
        ar_g, ar_p = torch.arange(lg, device=self.device), torch.arange(lp, device=self.device)
        mask_g = torch.zeros(r, 1, 1, lg, device=self.device).masked_fill_((ar_g > step[:, None])[:, None, None], neg)
        mask_p = torch.zeros(s, 1, 1, lp, device=self.device).masked_fill_(
            (ar_p >= prompt_lens[:, None])[:, None, None], neg
        )
        rows = torch.arange(lo, lo + r, device=self.device)
        gather = members.clamp(max=r - 1).view(-1)  # padding entries read row R-1; their results are unused

        def attend(i, a, q, k, v):  # q: [R, 1, H, hd], k/v: [R, 1, KV, hd]
            self.gk[i, rows, :, step] = k[:, 0]
            self.gv[i, rows, :, step] = v[:, 0]
            q = q.view(r, kvh, g, hd)  # the query heads sharing each kv head
            # own generated tokens, chunk by chunk: o [R, KV, G, hd], lse [R, KV, G, 1]
            parts = [
                _attention(
                    q[b:e],
                    self.gk[i, lo + b : lo + e, :, :length],
                    self.gv[i, lo + b : lo + e, :, :length],
                    mask_g[b:e, ..., :length],
                    a.scaling,
                )
                for b, e, length in chunks
            ]
            og, lse_g = parts[0] if len(parts) == 1 else [torch.cat(x) for x in zip(*parts)]
            # shared prompt: all samples' queries of a prompt slot against its keys at once: [S, KV, n*G, .]
            qp = q[gather].view(s, n, kvh, g, hd).transpose(1, 2).reshape(s, kvh, n * g, hd)
            op, lse_p = _attention(qp, self.pk[i, :s, :, :lp], self.pv[i, :s, :, :lp], mask_p, a.scaling)

            def to_rows(x):  # [S, KV, n*G, c] -> [R, KV, G, c]
                return x.view(s, kvh, n, g, -1).transpose(1, 2).reshape(s * n, kvh, g, -1)[member_of]

            op, lse_p = to_rows(op), to_rows(lse_p)
            lse = torch.logaddexp(lse_g, lse_p)  # exact merge of the two softmax pieces
            o = og * torch.exp(lse_g - lse) + op * torch.exp(lse_p - lse)  # [R, KV, G, hd]
            return o.to(v.dtype).view(r, 1, -1)

        h = self._forward(tokens[:, None], (prompt_len + step)[:, None], attend)
        return self.head(h[:, 0])

    def move_rows(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first `length` generated positions of generation-cache rows src -> dst (any overlap)."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.gk[:, d, :, :length] = self.gk[:, s, :, :length]  # the gather on the right copies first
        self.gv[:, d, :, :length] = self.gv[:, s, :, :length]

    def move_prompts(self, src: list[int], dst: list[int]) -> None:
        """Copy prompt-cache slots src -> dst."""
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        self.pk[:, d] = self.pk[:, s]
        self.pv[:, d] = self.pv[:, s]
