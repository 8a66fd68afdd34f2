"""The chunked distillation loss against brute-force full-vocabulary computations built with autograd."""

import pytest
import torch
import torch.nn.functional as F

from ssb.distill.loss import DenseTeacher, DistillLoss, OutputHead, SparseTeacher, final_hidden
from ssb.distill.store import sparsify

T = 2.0


def _setup(n=13, h=8, v=40, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    teacher_logits = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, teacher_logits, targets


def _brute_full_kl(z, zt):  # sum over tokens of T^2 KL(p || q), everything dense
    logq = torch.log_softmax(z / T, -1)
    logp = torch.log_softmax(zt / T, -1)
    return (T * T * (logp.exp() * (logp - logq)).sum(-1)).sum()


def _brute_bucket_kl(z, zt, k):  # the teacher's top-k + one tail bucket, on both sides, dense and autograd
    logp = torch.log_softmax(zt / T, -1)
    ids = logp.topk(k, -1).indices
    in_top = torch.zeros_like(logp, dtype=torch.bool).scatter(1, ids, True)
    p_top = logp.exp().gather(1, ids)
    p_tail = (logp.exp() * ~in_top).sum(-1)
    q = torch.softmax(z / T, -1)
    q_top = q.gather(1, ids)
    q_tail = (q * ~in_top).sum(-1)
    kl = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return (T * T * kl).sum()


def _grads(fn, *tensors):
    ts = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*ts)
    out.backward()
    return out.detach(), [t.grad for t in ts]


def _ours(hidden, weight, teacher, targets, *, kd=1.0, ce=0.0, bias=None, normalizer=None, chunk=4, softcap=None):
    loss_fn = DistillLoss(T, kd_weight=kd, ce_weight=ce, chunk_size=chunk)

    def fn(h, w, *b):
        head = OutputHead(w, b[0] if b else None, softcap)
        return loss_fn(h, targets, teacher, normalizer, head=head).loss

    return _grads(fn, hidden, weight, *([bias] if bias is not None else []))


def test_sparse_with_k_equal_vocab_is_the_full_kl():
    hidden, weight, _, zt, targets = _setup()
    teacher = sparsify(zt, k=weight.shape[0], temperature=T)
    assert torch.isinf(teacher.log_tail).all() and (teacher.log_tail < 0).all()
    ours, (gh, gw) = _ours(hidden, weight, teacher, targets)
    ref, (rh, rw) = _grads(lambda h, w: _brute_full_kl(h @ w.T, zt) / h.shape[0], hidden, weight)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_sparse_top_k_matches_bucketed_brute_force(k):
    hidden, weight, _, zt, targets = _setup(seed=k)
    teacher = sparsify(zt, k=k, temperature=T)
    ours, (gh, gw) = _ours(hidden, weight, teacher, targets)
    ref, (rh, rw) = _grads(lambda h, w: _brute_bucket_kl(h @ w.T, zt, k) / h.shape[0], hidden, weight)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10)


def test_tail_bucket_when_student_mass_is_outside_teacher_top_k():
    n, v, k = 5, 30, 4
    zt = torch.zeros(n, v, dtype=torch.float64)
    zt[:, :k] = 6.0  # teacher: almost everything on tokens 0..3
    z = torch.zeros(n, v, dtype=torch.float64)
    z[:, -3:] = 9.0  # student: almost everything on tokens 27..29, which the teacher's top-k misses
    teacher = sparsify(zt, k=k, temperature=T)
    loss_fn = DistillLoss(T, chunk_size=2)
    ours, (gz,) = _grads(lambda x: loss_fn(x, torch.zeros(n, dtype=torch.long), teacher).loss, z)
    ref, (rz,) = _grads(lambda x: _brute_bucket_kl(x, zt, k) / n, z)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    assert ours.item() > 5.0  # the mismatch is seen, not hidden in the bucket
    torch.testing.assert_close(gz, rz, rtol=1e-8, atol=1e-12)
    assert (gz[:, -3:] > 0).all() and (gz[:, :k] < 0).all()  # push mass out of the tail into the teacher's top-k


def test_float32_student_tail_mass_on_both_paths():
    """The student's tail mass comes from 1 - its top-k mass unless the tail holds under 1% (then the exact
    masked log-sum-exp): in float32, rows of both kinds agree with the float64 brute force."""
    n, v, k = 8, 50, 5
    g = torch.Generator().manual_seed(7)
    zt = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    top = torch.log_softmax(zt / T, -1).topk(k, -1).indices
    z[:4] = z[:4].scatter(1, top[:4], 30.0)  # rows 0-3: the student's tail mass is far below 1%
    teacher = sparsify(zt, k=k, temperature=T)
    q_tail = 1 - torch.softmax(z / T, -1).gather(1, top).sum(-1)
    assert (q_tail[:4] < 1e-2).all() and (q_tail[4:] > 1e-2).all()
    loss_fn = DistillLoss(T, chunk_size=3)
    ours, (gz,) = _grads(lambda x: loss_fn(x, torch.zeros(n, dtype=torch.long), teacher).loss, z.float())
    ref, (rz,) = _grads(lambda x: _brute_bucket_kl(x, zt, k) / n, z)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-6)


def test_autocast_runs_the_head_in_bf16_with_bias_and_softcap():
    """Under bf16 autocast (train.mixed_precision) the head's matmuls run in bf16, the softmax math in fp32:
    loss and gradients stay within bf16 rounding of the fp32 computation, bias and softcap included."""
    hidden, weight, bias, zt, targets = _setup(n=16, h=32, v=64, seed=5, bias=True)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    teacher = sparsify(zt.float(), k=8, temperature=T)
    exact, (gh, gw, gb) = _ours(hidden, weight, teacher, targets, ce=0.5, bias=bias, softcap=5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, (mh, mw, mb) = _ours(hidden, weight, teacher, targets, ce=0.5, bias=bias, softcap=5.0)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(exact.item(), rel=2e-2)
    for a, b in ((gh, mh), (gw, mw), (gb, mb)):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_fp16_stored_logprobs_are_renormalised():
    hidden, weight, _, zt, targets = _setup(seed=3)
    exact = sparsify(zt, k=8, temperature=T)
    stored = SparseTeacher(exact.ids.to(torch.int32), exact.logprobs.half(), exact.log_tail.float())
    a, _ = _ours(hidden, weight, exact, targets)
    b, _ = _ours(hidden, weight, stored, targets)
    assert b.item() == pytest.approx(a.item(), rel=2e-3)


def test_ce_term_matches_cross_entropy_and_weights_combine():
    hidden, weight, _, zt, targets = _setup(seed=4)
    ours, (gh, gw) = _ours(hidden, weight, None, targets, kd=0.0, ce=1.0)
    ref, (rh, rw) = _grads(lambda h, w: F.cross_entropy(h @ w.T, targets), hidden, weight)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-10)
    teacher = sparsify(zt, k=weight.shape[0], temperature=T)
    mixed, (mh, _) = _ours(hidden, weight, teacher, targets, kd=0.7, ce=0.3)
    ref2, (r2h, _) = _grads(
        lambda h, w: 0.7 * _brute_full_kl(h @ w.T, zt) / h.shape[0] + 0.3 * F.cross_entropy(h @ w.T, targets),
        hidden,
        weight,
    )
    assert mixed.item() == pytest.approx(ref2.item(), rel=1e-9)
    torch.testing.assert_close(mh, r2h, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("temp", [0.7, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("k", [6, None])  # None: the dense teacher
def test_any_temperature_with_kd_and_ce_matches_brute_force(temp, k):
    """x = exp((z - m) / T) serves both terms (sum(exp(z - m)) = ||x||_T^T): check it away from T = 2, with the
    logged kd and ce sums as well as the loss and its gradients."""
    hidden, weight, _, _, targets = _setup(seed=6)
    n = hidden.shape[0]
    t_hidden = 1.5 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    zt = t_hidden @ weight.T
    teacher = DenseTeacher(t_hidden) if k is None else sparsify(zt, k=k, temperature=temp)
    head = OutputHead(weight, None, None)
    out = DistillLoss(temp, kd_weight=0.6, ce_weight=0.4, chunk_size=5)(hidden, targets, teacher, head=head)
    ours, (gh,) = _grads(
        lambda h: (
            DistillLoss(temp, kd_weight=0.6, ce_weight=0.4, chunk_size=5)(
                h, targets, teacher, head=OutputHead(weight, None, None)
            ).loss
        ),
        hidden,
    )

    def brute(h):
        z = h @ weight.T
        logq, logp = torch.log_softmax(z / temp, -1), torch.log_softmax(zt / temp, -1)
        if k is None:
            kl = (logp.exp() * (logp - logq)).sum(-1)
        else:
            top = torch.zeros_like(z, dtype=torch.bool).scatter(1, logp.topk(k, -1).indices, True)
            p, q = logp.exp(), logq.exp()
            p_tail, q_tail = (p * ~top).sum(-1), (q * ~top).sum(-1)
            kl = (p * (logp - logq) * top).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
        return temp * temp * kl.sum(), F.cross_entropy(z, targets, reduction="sum")

    kd_ref, ce_ref = brute(hidden)
    assert out.kd_sum.item() == pytest.approx(kd_ref.item(), rel=1e-9)
    assert out.ce_sum.item() == pytest.approx(ce_ref.item(), rel=1e-9)
    ref, (rh,) = _grads(lambda h: (0.6 * brute(h)[0] + 0.4 * brute(h)[1]) / n, hidden)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)


def test_bf16_logits_are_read_without_a_float32_copy_and_give_float32_results():
    """Bf16 student logits (the head's output under autocast) go into the loss as they are: the result equals the
    float32 computation on the same (exactly widened) values."""
    _, _, _, zt, targets = _setup(n=9, v=70, seed=8)
    z = (3 * torch.randn(9, 70, generator=torch.Generator().manual_seed(1))).bfloat16()
    teacher = sparsify(zt.float(), k=7, temperature=T)
    loss_fn = DistillLoss(T, kd_weight=1.0, ce_weight=0.5, chunk_size=4)
    lo, (g_lo,) = _grads(lambda x: loss_fn(x, targets, teacher).loss, z)
    hi, (g_hi,) = _grads(lambda x: loss_fn(x, targets, teacher).loss, z.float())
    assert lo.dtype == torch.float32 and lo.item() == pytest.approx(hi.item(), rel=1e-6)
    assert g_lo.dtype == torch.bfloat16
    torch.testing.assert_close(g_lo.float(), g_hi, rtol=1e-2, atol=1e-4)


def test_normalizer_chunking_bias_and_softcap():
    hidden, weight, bias, zt, targets = _setup(seed=5, bias=True)
    teacher = sparsify(zt, k=6, temperature=T)
    a, ga = _ours(hidden, weight, teacher, targets, bias=bias, chunk=1, normalizer=40, softcap=3.0)

    def brute(h, w, b):
        z = torch.tanh((h @ w.T + b) / 3.0) * 3.0
        return _brute_bucket_kl(z, zt, 6) / 40

    ref, gr = _grads(brute, hidden, weight, bias)
    assert a.item() == pytest.approx(ref.item(), rel=1e-9)
    for x, y in zip(ga, gr):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    b, gb = _ours(hidden, weight, teacher, targets, bias=bias, chunk=100, normalizer=40, softcap=3.0)
    assert b.item() == pytest.approx(a.item(), rel=1e-12)


def test_dense_teacher_from_hidden_states_and_logits_input():
    hidden, weight, _, _, targets = _setup(seed=6)
    t_hidden = torch.randn_like(hidden)
    zt = t_hidden @ weight.T
    ours, (gh,) = _grads(
        lambda h: (
            DistillLoss(T, chunk_size=5)(h, targets, DenseTeacher(t_hidden), head=OutputHead(weight, None, None)).loss
        ),
        hidden,
    )
    ref, (rh,) = _grads(lambda h: _brute_full_kl(h @ weight.T, zt) / h.shape[0], hidden)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gh, rh, rtol=1e-8, atol=1e-10)
    # logits in, no head: the same numbers
    z = (hidden @ weight.T).detach()
    via_logits, (gz,) = _grads(lambda x: DistillLoss(T, chunk_size=5)(x, targets, DenseTeacher(zt)).loss, z)
    assert via_logits.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(gz @ weight, rh, rtol=1e-8, atol=1e-10)


def test_padding_is_masked_in_a_real_model_batch(tmp_path):
    from transformers import AutoModelForCausalLM

    from ssb.testing import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m")).eval()
    head = OutputHead.of(model)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 100, (n,), generator=g) for n in (9, 5)]
    sol = [(4, 9), (2, 5)]  # solution token span [start, end) of each sequence
    ids = torch.full((2, 9), 0, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    shift = torch.full((2, 9), -100)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
        ids[b, len(s) :] = 7  # padding tokens that must not matter
        shift[b, sol[b][0] - 1 : sol[b][1] - 1] = s[sol[b][0] : sol[b][1]]
    teacher_states = torch.randn(int((shift != -100).sum()), head.weight.shape[1], generator=g)
    loss_fn = DistillLoss(T, kd_weight=1.0, ce_weight=0.5)
    with torch.no_grad():
        m = shift != -100
        batched = loss_fn(final_hidden(model, ids, mask)[m], shift[m], DenseTeacher(teacher_states), head=head)
        total, row = 0.0, 0
        for b, s in enumerate(seqs):  # each sequence alone, unpadded
            h = final_hidden(model, s[None], torch.ones(1, len(s), dtype=torch.long))[0]
            start, end = sol[b]
            n = end - start
            one = loss_fn(
                h[start - 1 : end - 1],
                s[start:end],
                DenseTeacher(teacher_states[row : row + n]),
                normalizer=m.sum(),
                head=head,
            )
            total += one.loss.item()
            row += n
    assert batched.tokens == 8
    assert batched.loss.item() == pytest.approx(total, rel=1e-5)
