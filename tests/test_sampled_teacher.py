"""Sampled teacher storage (random-sampling KD and the top-k head + tail-samples hybrid): the loss's gradient and
KL value are unbiased estimates of the full-vocabulary ones, the store round-trips and reproduces its draws, and
stores of the previous schema version still read."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssb.distill.loss import DistillLoss, SampledTeacher
from ssb.distill.store import (
    SCHEMA_VERSION,
    TeacherStore,
    TeacherStoreError,
    TeacherStoreWriter,
    auto_slots,
    bytes_per_token,
    draw,
    estimate,
    example_generator,
    sparsify,
)

T = 2.0
V2_FIXTURE = Path(__file__).parent / "data" / "store-v2"


def _problem(n=5, h=6, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    zt = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.5  # teacher logits
    return hidden, weight, zt


def _full_kd(hidden, weight, zt):  # sum over tokens of T^2 KL(p || q), dense, autograd
    logq = torch.log_softmax(hidden @ weight.T / T, -1)
    logp = torch.log_softmax(zt / T, -1)
    return T * T * (logp.exp() * (logp - logq)).sum()


def _draws(zt, draws, samples, head, seed):
    """`draws` independent stored draws for each of the N teacher rows: a SampledTeacher over draws * N rows."""
    rows = draw(zt.repeat(draws, 1), T, samples, head, torch.Generator().manual_seed(seed))
    return estimate(rows, head)


@pytest.mark.parametrize("head", [0, 3])  # sampled; hybrid (top-3 head + draws from the tail)
def test_gradient_and_kl_are_unbiased_over_many_draws(head):
    """Mean over D = 4000 independent draws of the gradient (w.r.t. logits, hidden states and the head weight) and
    of the KL value equals the full-vocabulary one. Each element's tolerance is 5 standard errors of that mean,
    sd / sqrt(D) with sd the spread of the D per-draw values (a two-sided 5-sigma bound: about 6e-7 per element,
    under 1e-3 over the few hundred elements tested; the draws are seeded, so the test is deterministic)."""
    hidden, weight, zt = _problem()
    n, d, samples = hidden.shape[0], 4000, 8
    hidden_full = hidden.clone().requires_grad_(True)
    weight_full = weight.clone().requires_grad_(True)
    kd_full = _full_kd(hidden_full, weight_full, zt)
    kd_full.backward()
    teacher = _draws(zt, d, samples, head, seed=1)
    assert teacher.ids.shape == (d * n, head + samples)
    torch.testing.assert_close(teacher.weights.sum(-1), torch.ones(d * n, dtype=teacher.weights.dtype))

    # Logits: each of the D * N rows is one draw's row; normalizer 1 keeps per-row gradients as sums.
    z = (hidden @ weight.T).repeat(d, 1).requires_grad_(True)  # [D * N, V]
    DistillLoss(T, chunk_size=4096)(z, torch.zeros(d * n, dtype=torch.long), teacher, normalizer=1).loss.backward()
    g_z = z.grad.view(d, n, -1)  # [D, N, V] per-draw gradients
    z_full = (hidden @ weight.T).requires_grad_(True)
    _full_kd_z = (
        T
        * T
        * (
            torch.log_softmax(zt / T, -1).exp() * (torch.log_softmax(zt / T, -1) - torch.log_softmax(z_full / T, -1))
        ).sum()
    )
    _full_kd_z.backward()
    _assert_mean_within(g_z, z_full.grad, "logits")

    # Hidden states and the head weight, through the loss's own head.
    from ssb.distill.loss import OutputHead

    h = hidden.repeat(d, 1).requires_grad_(True)  # [D * N, H]
    w = weight.clone().requires_grad_(True)
    out = DistillLoss(T, chunk_size=4096)(
        h, torch.zeros(d * n, dtype=torch.long), teacher, normalizer=1, head=OutputHead(w, None, None)
    )
    out.loss.backward()
    _assert_mean_within(h.grad.view(d, n, -1), hidden_full.grad, "hidden")
    per_draw_w = torch.einsum("dnv,nh->dvh", g_z, hidden)  # [D, V, H]: dL/dW of each draw (linear in g_z)
    _assert_mean_within(per_draw_w, weight_full.grad, "weight", mean=w.grad / d)

    # KL value: D batches of one draw each, via kd_sum (batch means of single draws = the per-draw values).
    kd = torch.stack(
        [
            DistillLoss(T)(
                hidden @ weight.T, torch.zeros(n, dtype=torch.long), teacher.rows(i * n, (i + 1) * n), normalizer=1
            ).kd_sum
            for i in range(d)
        ]
    )  # [D]
    _assert_mean_within(kd, kd_full.detach(), "kl value")


def _assert_mean_within(samples, full, what, mean=None):
    mean = samples.mean(0) if mean is None else mean
    se = samples.std(0) / samples.shape[0] ** 0.5
    z = (mean - full).abs() / (se + 1e-9)  # + 1e-9: elements without variance (the exact head) may round
    assert z.max() < 5, f"{what}: mean over draws is {z.max():.1f} standard errors from the full-KL value"
    assert se.max() > 0  # the draws did vary: the test is not vacuous


def test_topk_bucket_gradient_is_biased_where_the_sampled_one_is_not():
    """Power check for the test above: the same 5-standard-error criterion rejects top-k + tail bucket (it is
    deterministic, so its 'mean over draws' is itself, and its error is far above the sampled scheme's noise)."""
    hidden, weight, zt = _problem()
    z_full = (hidden @ weight.T).requires_grad_(True)
    (
        T
        * T
        * (
            torch.log_softmax(zt / T, -1).exp() * (torch.log_softmax(zt / T, -1) - torch.log_softmax(z_full / T, -1))
        ).sum()
    ).backward()
    z = (hidden @ weight.T).requires_grad_(True)
    topk = sparsify(zt, 11, T)  # as many ids as the hybrid's 3 + 8
    DistillLoss(T)(z, torch.zeros(len(z), dtype=torch.long), topk, normalizer=1).loss.backward()
    teacher = _draws(zt, 4000, 8, 3, seed=1)
    zs = (hidden @ weight.T).repeat(4000, 1).requires_grad_(True)
    DistillLoss(T, chunk_size=4096)(zs, torch.zeros(len(zs), dtype=torch.long), teacher, normalizer=1).loss.backward()
    se = zs.grad.view(4000, len(z), -1).std(0) / 4000**0.5
    assert ((z.grad - z_full.grad).abs() / (se + 1e-12)).max() > 50


def test_sampled_gradient_matches_a_dense_brute_force_of_the_estimate():
    """For one draw, the loss's closed-form gradient is that of T^2 sum_s w_s (log p_s - log q_s) by autograd."""
    hidden, weight, zt = _problem(seed=3)
    teacher = _draws(zt, 1, 16, 2, seed=5)
    z = (hidden @ weight.T).requires_grad_(True)
    out = DistillLoss(T)(z, torch.zeros(len(z), dtype=torch.long), teacher, normalizer=1)
    out.loss.backward()
    z2 = (hidden @ weight.T).requires_grad_(True)
    logq = torch.log_softmax(z2 / T, -1).gather(1, teacher.ids)
    brute = T * T * (teacher.weights * (teacher.logprobs - logq)).sum()
    brute.backward()
    torch.testing.assert_close(out.kd_sum, brute.detach())
    torch.testing.assert_close(z.grad, z2.grad)


@pytest.mark.parametrize("kind,head,samples", [("sampled", 0, 6), ("hybrid", 3, 5)])
def test_round_trip_reproducible_draws_and_bytes(tmp_path, kind, head, samples):
    logits = {f"e{i}": torch.randn(3 + i, 50, generator=torch.Generator().manual_seed(i)) * 3 for i in range(4)}

    def write(root, seed):
        w = TeacherStoreWriter(
            root,
            temperature=T,
            top_k=head,
            vocab_size=50,
            fingerprint="f",
            kind=kind,
            samples=samples,
            seed=seed,
            shard_size=2,
        )
        for eid, z in logits.items():
            w.add(eid, draw(z, T, samples, head, example_generator(seed, eid)))
        return w.close()

    counts = write(tmp_path / "a", seed=7)
    write(tmp_path / "b", seed=7)
    write(tmp_path / "c", seed=8)
    assert counts["tokens"] == sum(len(z) for z in logits.values())
    payload = bytes_per_token(head, kind, vocab_size=50, samples=samples)
    assert payload == 4 * (head + samples) + (4 if kind == "hybrid" else 0)
    a, b, c = (TeacherStore(tmp_path / x) for x in "abc")
    assert a.kind == kind and a.samples == samples and a.top_k == head and a.index["schema_version"] == SCHEMA_VERSION
    differs = False
    for eid, z in logits.items():
        got = a[eid]
        assert isinstance(got, SampledTeacher) and got.ids.shape == (len(z), head + samples)
        assert torch.equal(got.ids, b[eid].ids)  # same (seed, example id): same draws
        differs |= not torch.equal(got.ids, c[eid].ids)
        logp = torch.log_softmax(z / T, -1)
        torch.testing.assert_close(got.logprobs, logp.gather(1, got.ids), atol=4e-3, rtol=1e-3)  # float16
        torch.testing.assert_close(got.weights.sum(-1), torch.ones(len(z)))
        if head:
            assert torch.equal(got.ids[:, :head], logp.topk(head).indices)
            torch.testing.assert_close(got.weights[:, :head], logp.topk(head).values.exp(), atol=2e-3, rtol=2e-3)
            assert not (got.ids[:, head:, None] == got.ids[:, None, :head]).any()  # draws come from the tail
    assert differs  # another seed draws other tokens


def test_auto_slots_fill_the_byte_budget():
    assert auto_slots(49152, "sampled") == 250 and bytes_per_token(0, "sampled", vocab_size=49152, samples=250) == 1000
    assert auto_slots(151936, "hybrid") == 166 and bytes_per_token(100, "hybrid", 0, 151936, 66) == 1000


def test_reads_a_store_written_with_schema_version_2(tmp_path):
    """tests/data/store-v2 was written by the schema-2 code (commit before this one): 3 examples of top-4 rows from
    torch.randn(3 + i, 50) * 3 with generator seed 7, at T = 2."""
    assert json.loads((V2_FIXTURE / "index.json").read_text())["schema_version"] == 2
    store = TeacherStore(V2_FIXTURE)
    assert store.kind == "topk" and store.samples == 0 and len(store) == 3
    g = torch.Generator().manual_seed(7)
    for i in range(3):
        want = sparsify(torch.randn(3 + i, 50, generator=g) * 3, 4, 2.0)
        got = store[f"e{i}"]
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got.log_tail, want.log_tail)
    store.check(temperature=2.0, vocab_size=50, fingerprint="v2fixture")
    # resuming it with this version is refused with what to do
    shutil.copytree(V2_FIXTURE, tmp_path / "old")
    with pytest.raises(TeacherStoreError, match="cannot resume: stored schema_version=2, now 3"):
        TeacherStoreWriter(
            tmp_path / "old", temperature=2.0, top_k=4, vocab_size=50, fingerprint="v2fixture", resume=True
        )
    index = json.loads((tmp_path / "old" / "index.json").read_text())
    (tmp_path / "old" / "index.json").write_text(json.dumps({**index, "schema_version": 1}))
    with pytest.raises(TeacherStoreError, match="schema version 1, this ssb reads versions 2, 3"):
        TeacherStore(tmp_path / "old")


def test_kl_estimate_is_exact_when_the_draws_cover_a_one_hot_teacher():
    zt = torch.full((2, 10), -1e4, dtype=torch.float64)
    zt[:, 4] = 0.0
    teacher = _draws(zt, 1, 5, 0, seed=0)
    assert (teacher.ids == 4).all()
    z = torch.randn(2, 10, dtype=torch.float64)
    kd = DistillLoss(T)(z, torch.zeros(2, dtype=torch.long), teacher, normalizer=1).kd_sum
    torch.testing.assert_close(kd, -T * T * F.log_softmax(z / T, -1)[:, 4].sum())


def test_ssb_run_with_the_sampled_store(tmp_path, answering_model_dir):
    """`ssb run --set logits.store=sampled` end to end on a tiny model: the logits stage stores draws, training
    reads them and says its kd is a sampled estimate, and the student is evaluated."""
    from ssb.cli import main
    from ssb.rundir import RunDir

    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "question": f"Tom has {i} apples and {4 - i} more?", "answer": "4"}) + "\n"
            for i in range(6)
        )
    )
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {answering_model_dir}
baselines: []
data: {{train: {{source: {data}}}}}
rollout: {{k: 4, max_new_tokens: 16, batch_size: 16}}
teach: {{max_new_tokens: 16, batch_size: 8, attempts: 2}}
logits: {{batch_size: 4}}
train: {{epochs: 1, batch_size: 2, lora_r: 4, lora_alpha: 8}}
eval: {{data: {{source: {data}}}, max_new_tokens: 16}}
""")
    run = RunDir(tmp_path / "run")
    args = ["run", "--config", str(cfg), "--run-dir", str(run.root), "--set", "logits.store=sampled"]
    assert main(args) == 0
    stages = run.read_manifest()["stages"]
    assert stages["logits"]["counts"]["store"] == "sampled" and stages["logits"]["counts"]["samples"] == 250
    assert stages["train"]["counts"]["kd_is"] == "sampled_estimate"
    assert isinstance(
        TeacherStore(run.logits_dir)[json.loads(run.pairs.read_text().splitlines()[0])["id"]], SampledTeacher
    )
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert any("full_kd" in r for r in rows) and all(r["kd_is"] == "sampled_estimate" for r in rows)
    summary = json.loads((run.eval_dir("ssb", "q") / "summary.json").read_text())
    assert summary["problems"] == 6
