"""Distillation losses: KL(teacher || student) at temperature T plus optional cross-entropy, on solution tokens.

The teacher is either *sparse* (its top-k token log-probabilities and one tail bucket holding the rest of the
vocabulary, as stored by the logits stage), *sampled* (an unbiased estimate from tokens drawn from the teacher,
with or without an exact top-k head; docs/teacher-store.md) or *dense* (the frozen model's own hidden states or
logits, for the online mode: exact full-vocabulary KL). The student's logits are produced chunk by chunk from
its final hidden states at the solution positions only, and the gradient with respect to each chunk's logits is
written in closed form inside the forward pass, so neither a [B, T, V] student nor a [B, T, V] teacher tensor
ever exists: peak extra memory is a few [chunk, V] buffers.

Per solution token, with q = softmax(z / T) the student and p the teacher at the same temperature:

    sparse:  KL = sum_{i in top-k} p_i log(p_i / q_i) + p_tail log(p_tail / q_tail),  q_tail = 1 - sum_{top-k} q_i
    sampled: KL^ = sum_s w_s (log p(id_s) - log q(id_s))   with p^ = sum_s w_s onehot(id_s) and E[p^] = p
    dense:   KL = sum_v p_v log(p_v / q_v)
    kd       = T^2 * KL                    dkd/dz = T * (q - p~)  (p~ spreads p_tail over the tail in proportion to q)
    sampled: dkd/dz = T * (sum(w) q - p^)  (linear in p^: its expectation over the draws is the dense gradient)
    ce       = -log softmax(z)[target]     dce/dz = softmax(z) - onehot(target)
    loss     = (kd_weight * sum kd + ce_weight * sum ce) / normalizer

`normalizer` is the number of solution tokens in the whole accumulated (and, across processes, global) batch, so
gradient accumulation and data parallelism give the token-level mean of the full effective batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Elements per [chunk, V] float32 buffer (64 MiB); a chunk holds two to four of them at once (the logits, the exp
# buffer that becomes the gradient, with CE or softcap one more).
CHUNK_ELEMENTS = 1 << 24


class SparseTeacher(NamedTuple):
    """The stored teacher distribution at the N solution positions of a batch, in batch-major order."""

    ids: Tensor  # [N, k] int64: the teacher's top-k token ids
    logprobs: Tensor  # [N, k] float: their log-probabilities at temperature T
    log_tail: Tensor  # [N] float: log of the teacher's probability mass outside its top-k (-inf when k = V)

    def rows(self, start: int, end: int) -> SparseTeacher:
        return SparseTeacher(self.ids[start:end], self.logprobs[start:end], self.log_tail[start:end])


class SampledTeacher(NamedTuple):
    """An unbiased sparse estimate of the teacher at the N solution positions (logits.store=sampled or hybrid):
    p^ = sum_s weights[:, s] * onehot(ids[:, s]), built from tokens drawn from the teacher at temperature T, with
    E[p^] = p over the draws. Both the KL estimate and its gradient are linear in p^, hence unbiased."""

    ids: Tensor  # [N, S] int64 token ids (a token drawn twice fills two slots; head ids first for hybrid)
    weights: Tensor  # [N, S] float: the estimate's mass on each slot (each row sums to one)
    logprobs: Tensor  # [N, S] float: the teacher's log-probability of each slot's token at T (for the KL value)

    def rows(self, start: int, end: int) -> SampledTeacher:
        return SampledTeacher(self.ids[start:end], self.weights[start:end], self.logprobs[start:end])


class DenseTeacher(NamedTuple):
    """The frozen teacher's states at the N solution positions: [N, H] final hidden states (online, or stored with
    logits.store=hidden), projected by the student's own output head (the same frozen base head), or [N, V]
    logits when the loss is called without a head. Gives the exact full-vocabulary KL."""

    states: Tensor  # [N, H] or [N, V]

    def rows(self, start: int, end: int) -> DenseTeacher:
        return DenseTeacher(self.states[start:end])


class LossOutput(NamedTuple):
    loss: Tensor  # [] differentiable: (kd_weight * kd_sum + ce_weight * ce_sum) / normalizer
    kd_sum: Tensor | None  # [] detached sum of T^2 * KL over tokens (None without a teacher)
    ce_sum: Tensor  # [] detached sum of the cross-entropy over tokens (always computed, for logging)
    tokens: int


@dataclass(frozen=True)
class OutputHead:
    """The model's output projection, applied by the loss itself to chunks of hidden states."""

    weight: Tensor  # [V, H]
    bias: Tensor | None  # [V]
    softcap: float | None  # Gemma-style final logit soft-capping: z = c * tanh(z / c)

    @classmethod
    def of(cls, model) -> OutputHead:
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"the model's output head is a {type(head).__name__}, not a plain Linear layer; ssb "
                f"applies the head itself to chunks of hidden states (LoRA on lm_head is not supported)"
            )
        softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        return cls(head.weight, head.bias, float(softcap) if softcap else None)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, hidden: Tensor) -> Tensor:
        """[C, H] -> [C, V] logits in float32 (float64 for float64 inputs); use on chunks."""
        z = F.linear(hidden, self.weight, self.bias).to(_compute_dtype(hidden))
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, S] -> [B, S, H] final (post-norm) hidden states, through the model's own forward (so DDP, PEFT and
    gradient checkpointing hooks run), asking for the logits of no position at all: an empty boolean
    `logits_to_keep` mask. (`logits_to_keep=1` would keep a [B, H, V] expanded copy of the head weight alive for
    the backward pass: 432 MiB for SmolLM2 at batch 4.)"""
    keep = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
        logits_to_keep=keep,
    )
    return out.hidden_states[-1]


@torch.no_grad()
def check_head(model, head: OutputHead, input_ids: Tensor) -> None:
    """Refuse a model whose logits are not `head(final hidden state)` (e.g. an unknown logit scaling)."""
    ids = input_ids[:, :16]
    mask = torch.ones_like(ids)
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [1, s, V]
    ours = head.logits(final_hidden(model, ids, mask)[0])  # [s, V]
    err = (full[0] - ours).abs().max().item()
    if err > 1e-3 * max(1.0, full.abs().max().item()):
        raise ValueError(
            f"{type(model).__name__}: its logits differ from the output head applied to the final "
            f"hidden states (max error {err:.3g}); this architecture is not supported"
        )


def _chunk(
    z: Tensor,
    tgt: Tensor,
    teacher: SparseTeacher | SampledTeacher | DenseTeacher | None,
    head: OutputHead | None,
    T: float,
    kd_scale: float | None,
    ce_scale: float | None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """One chunk of student logits z [C, V] (any float dtype, left unchanged) and targets [C] -> per-row T^2 * KL
    [C] (None without a teacher), per-row cross-entropy [C], and the gradient with respect to z: kd_scale times
    that of the KL term plus ce_scale times that of the CE term (a part whose scale is None is left out).

    One exp pass over [C, V] serves both terms: x = exp((z - m) / T) with m the row max, so that q = x / sum(x)
    and sum(exp(z - m)) = sum(x^T) = ||x||_T^T. x then becomes the gradient in place. Bf16 logits are read as they
    are (every product is promoted to float32), so no float32 copy of z is made either."""
    cd = _compute_dtype(z)
    t = T if teacher is not None else 1.0
    m = z.amax(-1, keepdim=True).to(cd)  # [C, 1]
    x = torch.add(-m / t, z, alpha=1.0 / t).exp_()  # [C, V] exp((z - m) / t), in [0, 1]
    s_t = x.sum(-1)  # [C]
    s_1 = s_t if t == 1 else torch.linalg.vector_norm(x, ord=t, dim=-1).pow(t)  # [C] sum(exp(z - m)) >= 1
    m = m[:, 0]
    ce = m + s_1.log() - z.gather(1, tgt[:, None])[:, 0].to(cd)  # [C]
    grad_ce = None
    if ce_scale is not None:  # ce_scale * (softmax(z) - onehot(target))
        grad_ce = (x * (ce_scale / s_1)[:, None]) if t == 1 else x.pow(t).mul_((ce_scale / s_1)[:, None])
        grad_ce.scatter_add_(1, tgt[:, None], torch.full_like(ce[:, None], -ce_scale))
    if teacher is None:
        return None, ce, grad_ce
    log_s = s_t.log()  # [C]
    if isinstance(teacher, DenseTeacher):
        zt = teacher.states if head is None else head.logits(teacher.states.to(head.weight.dtype))
        logp = torch.log_softmax(zt.to(cd) / T, dim=-1)  # [C, V]
        p = logp.exp()
        logq = torch.add((-m / T - log_s)[:, None], z, alpha=1.0 / T)  # [C, V]
        kl = torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)  # [C]
        grad = None if kd_scale is None else x.div_(s_t[:, None]).sub_(p).mul_(T * kd_scale)
    elif isinstance(teacher, SampledTeacher):
        ids, w = teacher.ids.long(), teacher.weights.to(cd)  # [C, S]
        logq_s = (z.gather(1, ids).to(cd) - m[:, None]) / T - log_s[:, None]  # [C, S]
        kl = torch.where(w > 0, w * (teacher.logprobs.to(cd) - logq_s), 0.0).sum(-1)  # [C] unbiased KL estimate
        grad = None
        if kd_scale is not None:  # T * (sum(w) q - p^): scatter_add, since a drawn token may fill several slots
            c = T * kd_scale
            grad = x.mul_((w.sum(-1) * c / s_t)[:, None])
            grad.scatter_add_(1, ids, w * -c)
    else:
        ids = teacher.ids.long()  # [C, k]
        # Renormalise the stored buckets (fp16 rounding) so they sum to exactly one.
        lp, tail = teacher.logprobs.to(cd), teacher.log_tail.to(cd)
        logp = torch.log_softmax(torch.cat([lp, tail[:, None]], -1), -1)  # [C, k+1]
        logq_top = (z.gather(1, ids).to(cd) - m[:, None]) / T - log_s[:, None]  # [C, k]
        # The student's tail mass is 1 - its top-k mass, in float64: exact to 1e-4 relative where the tail holds at
        # least 1% of the mass; the rows below that sum their tail terms themselves.
        tail_mass = 1.0 - logq_top.double().exp().sum(-1)  # [C]
        logq_tail = tail_mass.clamp(min=1e-300).log().to(cd)
        small = (tail_mass < 1e-2).nonzero()[:, 0]
        if small.numel():
            logq_tail[small] = (x[small].scatter(1, ids[small], 0.0).sum(-1) / s_t[small]).log()
        logq_b = torch.cat([logq_top, logq_tail[:, None]], -1)  # [C, k+1]
        p = logp.exp()
        kl = torch.where(p > 0, p * (logp - logq_b), 0.0).sum(-1)  # [C]
        grad = None
        if kd_scale is not None:
            # Tail tokens: q_j - p_tail * q_j / q_tail; top-k: q_i - p_i; times T (T^2, and d/dz = 1/T d/d(z/T)).
            ratio = torch.where(p[:, -1] > 0, (logp[:, -1] - logq_tail).exp(), 0.0)  # [C]
            c = T * kd_scale
            grad = x.mul_(((1.0 - ratio) * c / s_t)[:, None])
            grad.scatter_(1, ids, (logq_top.exp() - p[:, :-1]) * c)
    if grad_ce is not None:
        grad = grad_ce if grad is None else grad.add_(grad_ce)
    return kl * T * T, ce, grad


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, bias, head, targets, teacher, T, kd_w, ce_w, normalizer, chunk):
        # inputs [N, H] hidden states (or [N, V] logits when head is None); targets [N]
        n = inputs.shape[0]
        need_in, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        want = need_in or need_w or need_b
        grad_in = torch.zeros_like(inputs) if need_in else None
        cd = _compute_dtype(inputs)
        grad_w = torch.zeros(weight.shape, dtype=cd, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=cd, device=bias.device) if need_b else None
        kd_sum = inputs.new_zeros((), dtype=cd)
        ce_sum = inputs.new_zeros((), dtype=cd)
        scale = 1.0 / float(normalizer)  # the token-level mean over the effective batch, folded into the gradients
        kd_scale = kd_w * scale if kd_w != 0 and want and teacher is not None else None
        ce_scale = ce_w * scale if ce_w != 0 and want else None
        # Under autocast the head's matmuls run in its dtype, as in the model's own forward; the weight is cast
        # once here (autocast would cast it again at each of the 2 x chunks matmuls), and they run with autocast off.
        dev = inputs.device.type
        autocast = head is not None and torch.is_autocast_enabled(dev)
        w, b = weight, bias
        if autocast:
            w = weight.to(torch.get_autocast_dtype(dev))
            b = None if bias is None else bias.to(w.dtype)
        plain = torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext()
        for s in range(0, n, chunk):
            x = inputs[s : s + chunk]  # [C, H]
            if head is None:
                z = x
            else:
                with plain:
                    z = F.linear(x.to(w.dtype), w, b)  # [C, V], in the head's (or autocast's) dtype
                if head.softcap:
                    th = torch.tanh(z.to(cd) / head.softcap)
                    z = th * head.softcap
            kd, ce, grad = _chunk(
                z,
                targets[s : s + chunk],
                None if teacher is None else teacher.rows(s, s + chunk),
                head,
                T,
                kd_scale,
                ce_scale,
            )
            del z
            ce_sum += ce.sum()
            if kd is not None:
                kd_sum += kd.sum()
            if grad is None:
                continue
            if head is not None and head.softcap:
                grad.mul_(1.0 - th * th)
            if head is None:
                if need_in:
                    grad_in[s : s + chunk] = grad.to(inputs.dtype)
                continue
            if need_in:
                with plain:
                    grad_in[s : s + chunk] = grad.to(w.dtype) @ w
            if need_w:
                grad_w += grad.t() @ x.to(cd)
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_in, grad_w, grad_b)
        ctx.has = (need_in, need_w, need_b)
        ctx.w_dtype = weight.dtype if weight is not None else None
        w_kd = kd_w if teacher is not None else 0.0
        loss = (w_kd * kd_sum + ce_w * ce_sum) * scale
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):
        grad_in, grad_w, grad_b = ctx.saved_tensors
        need_in, need_w, need_b = ctx.has
        out_in = grad_in * g_loss.to(grad_in.dtype) if need_in else None
        out_w = (grad_w * g_loss).to(ctx.w_dtype) if need_w else None
        out_b = (grad_b * g_loss).to(ctx.w_dtype) if need_b else None
        return out_in, out_w, out_b, None, None, None, None, None, None, None, None


class DistillLoss(nn.Module):
    """kd_weight * T^2 * KL(teacher || student) + ce_weight * CE, token-level mean over `normalizer` tokens.

    forward(inputs, targets, teacher, normalizer, head=None):
        inputs: [N, H] student final hidden states at the solution positions (projected by `head`), or
                [N, V] student logits when head is None
        targets: [N] the solution token ids (for the CE term and its logging)
        teacher: SparseTeacher, SampledTeacher, DenseTeacher, or None (pure CE, the SFT baseline)
        normalizer: solution tokens in the whole effective batch (defaults to N)
    """

    def __init__(
        self, temperature: float = 2.0, kd_weight: float = 1.0, ce_weight: float = 0.0, chunk_size: int | None = None
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if kd_weight < 0 or ce_weight < 0:
            raise ValueError(f"kd_weight and ce_weight must be >= 0, got {kd_weight} and {ce_weight}")
        self.temperature, self.kd_weight, self.ce_weight = float(temperature), float(kd_weight), float(ce_weight)
        self.chunk_size = chunk_size

    def forward(
        self,
        inputs: Tensor,
        targets: Tensor,
        teacher: SparseTeacher | SampledTeacher | DenseTeacher | None,
        normalizer: int | float | Tensor | None = None,
        head: OutputHead | None = None,
    ) -> LossOutput:
        if teacher is None and self.kd_weight != 0:
            raise ValueError("kd_weight > 0 needs a teacher (stored top-k logits or the online teacher)")
        n = inputs.shape[0]
        normalizer = n if normalizer is None else normalizer
        if n == 0:  # keeps the graph connected (DDP expects every rank to produce gradients)
            zero = inputs.sum() * 0.0
            return LossOutput(zero, None if teacher is None else zero.detach(), zero.detach(), 0)
        vocab = head.vocab_size if head is not None else inputs.shape[-1]
        chunk = self.chunk_size or max(1, CHUNK_ELEMENTS // vocab)
        weight = head.weight if head is not None else None
        bias = head.bias if head is not None else None
        loss, kd_sum, ce_sum = _ChunkedDistill.apply(
            inputs,
            weight,
            bias,
            head,
            targets,
            teacher,
            self.temperature,
            self.kd_weight,
            self.ce_weight,
            normalizer,
            chunk,
        )
        return LossOutput(loss, None if teacher is None else kd_sum, ce_sum, n)
