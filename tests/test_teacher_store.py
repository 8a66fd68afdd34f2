"""Sparse teacher storage (round trip, resume, refusal of mismatches) and the logits stage on a tiny model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ssb.config import load_config
from ssb.distill.loss import SparseTeacher
from ssb.distill.store import TeacherStore, TeacherStoreError, TeacherStoreWriter, auto_top_k, bytes_per_token, sparsify
from ssb.rundir import RunDir
from ssb.testing import write_arith_pairs

META = dict(temperature=2.0, top_k=4, vocab_size=50, fingerprint="abc", model="m")


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return sparsify(torch.randn(n, 50, generator=g) * 3, k=4, temperature=2.0)


def test_round_trip_across_shards(tmp_path):
    w = TeacherStoreWriter(tmp_path, shard_size=2, **META)
    rows = {f"e{i}": _rows(3 + i, i) for i in range(5)}
    for eid, r in rows.items():
        w.add(eid, r)
    counts = w.close()
    assert counts["examples"] == 5 and counts["shards"] == 3 and counts["tokens"] == sum(3 + i for i in range(5))
    store = TeacherStore(tmp_path)
    assert len(store) == 5 and "e3" in store and "x" not in store
    for eid, r in rows.items():
        got = store[eid]
        assert torch.equal(got.ids, r.ids)
        torch.testing.assert_close(got.logprobs, r.logprobs, atol=2e-3, rtol=1e-3)  # stored as float16
        torch.testing.assert_close(got.log_tail, r.log_tail)
    # the buckets still sum to one
    total = torch.logsumexp(torch.cat([got.logprobs, got.log_tail[:, None]], -1), -1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=2e-3, rtol=0)
    with pytest.raises(TeacherStoreError, match="no teacher logits for example 'x'"):
        store["x"]


def test_shard_files_get_the_usual_permissions_not_0600(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    w = TeacherStoreWriter(tmp_path, shard_size=2, **META)
    for i in range(3):
        w.add(f"e{i}", _rows(3, i))
    w.close()
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


def test_hidden_state_store_round_trip_and_any_temperature(tmp_path):
    from ssb.distill.loss import DenseTeacher

    w = TeacherStoreWriter(tmp_path, kind="hidden", hidden_size=6, shard_size=1, **META)
    h = torch.randn(3, 6)
    w.add("a", h)
    with pytest.raises(ValueError, match=r"expected hidden states \[L, 6\]"):
        w.add("b", torch.randn(3, 5))
    counts = w.close()
    assert counts["tokens"] == 3
    store = TeacherStore(tmp_path)
    got = store["a"]
    assert isinstance(got, DenseTeacher) and store.kind == "hidden"
    torch.testing.assert_close(got.states, h, atol=2e-3, rtol=1e-3)
    store.check(temperature=1.0, vocab_size=50, fingerprint="abc")  # the exact distribution at any T
    assert bytes_per_token(0, "hidden", 576) == 1152


def test_bytes_per_token_is_under_a_kilobyte():
    assert bytes_per_token(64) == 64 * 4 + 64 * 2 + 4  # int32 ids
    assert bytes_per_token(64, vocab_size=49152) == 64 * 2 + 64 * 2 + 4  # 16-bit ids
    for vocab in (50, 49152, 65536, 65537, 151936):
        k = auto_top_k(vocab)
        assert bytes_per_token(k, vocab_size=vocab) <= 1000 < bytes_per_token(k + 1, vocab_size=vocab) or k == vocab


@pytest.mark.parametrize("vocab", [65536, 70000])
def test_ids_round_trip_at_both_ends_of_the_id_width(tmp_path, vocab):
    """16-bit ids (vocabularies up to 65,536) and 32-bit ids both give back every id, 0 and V-1 included."""
    ids = torch.tensor([[0, vocab - 1, 32767, 32768], [65535 % vocab, 1, 2, 3]])
    rows = SparseTeacher(ids, torch.full((2, 4), -2.0), torch.full((2,), -1.0))
    w = TeacherStoreWriter(tmp_path, **{**META, "vocab_size": vocab})
    w.add("a", rows)
    w.close()
    assert torch.equal(TeacherStore(tmp_path)["a"].ids, ids)
    dtype = load_file(tmp_path / "shard-00000.safetensors")["ids"].dtype
    assert dtype == (torch.int16 if vocab <= 65536 else torch.int32)


def test_mismatches_are_refused_with_clear_errors(tmp_path):
    w = TeacherStoreWriter(tmp_path, **META)
    w.add("a", _rows(2, 0))
    w.close()
    store = TeacherStore(tmp_path)
    store.check(temperature=2.0, vocab_size=50, fingerprint="abc")
    with pytest.raises(TeacherStoreError, match="temperature 2.0, training uses train.temperature=1.0"):
        store.check(temperature=1.0, vocab_size=50, fingerprint="abc")
    with pytest.raises(TeacherStoreError, match="vocabulary has 50 entries"):
        store.check(temperature=2.0, vocab_size=51, fingerprint="abc")
    with pytest.raises(TeacherStoreError, match="another model or tokenizer"):
        store.check(temperature=2.0, vocab_size=50, fingerprint="xyz")
    index = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "schema_version": 99}))
    with pytest.raises(TeacherStoreError, match="schema version 99"):
        TeacherStore(tmp_path)
    with pytest.raises(TeacherStoreError, match="missing index.json"):
        TeacherStore(tmp_path / "nowhere")


def test_a_killed_writer_resumes_with_the_examples_not_stored(tmp_path):
    w = TeacherStoreWriter(tmp_path, shard_size=2, **META)
    for i in range(3):
        w.add(f"e{i}", _rows(2, i))
    del w  # killed: e0 and e1 are in a finished shard, e2 was only buffered
    with pytest.raises(TeacherStoreError, match="did not finish"):
        TeacherStore(tmp_path)
    with pytest.raises(TeacherStoreError, match="already holds"):
        TeacherStoreWriter(tmp_path, shard_size=2, **META)
    with pytest.raises(TeacherStoreError, match="cannot resume: stored temperature=2.0"):
        TeacherStoreWriter(tmp_path, shard_size=2, resume=True, **{**META, "temperature": 1.0})
    w = TeacherStoreWriter(tmp_path, shard_size=2, resume=True, **META)
    assert w.done == {"e0", "e1"}
    with pytest.raises(TeacherStoreError, match="stored twice"):
        w.add("e1", _rows(2, 1))
    w.add("e2", _rows(2, 2))
    w.close()
    store = TeacherStore(tmp_path)
    assert len(store) == 3 and torch.equal(store["e2"].ids, _rows(2, 2).ids)


# ------------------------------------------------------------------------------------- the logits stage


def _sharp_tiny_model(path):
    """The random tiny model, made context-dependent and peaked, so hinted and plain prompts disagree."""
    from transformers import AutoModelForCausalLM

    from ssb.testing import make_tiny_model

    make_tiny_model(path)
    m = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        m.model.norm.weight.mul_(30)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _sharp_tiny_model(tmp_path_factory.mktemp("tiny"))
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _run(tmp_path, tiny, n=5, **sets):
    path, _, tok = tiny
    run = RunDir(tmp_path / "run").mkdir()
    write_arith_pairs(run.pairs, tok, n)
    over = {
        "model": str(path),
        "logits.store": "topk",
        "logits.top_k": 16,
        "logits.batch_size": 2,
        "logits.shard_size": 2,
        **sets,
    }
    return run, load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_logits_stage_stores_the_teacher_distribution_over_solution_tokens(tmp_path, tiny):
    from ssb.distill.pairs import encode_pairs, read_pairs
    from ssb.stages.logits import logits

    run, cfg = _run(tmp_path, tiny)
    counts = logits(cfg, run)
    assert counts["examples"] == 5 and counts["top_k"] == 16 and counts["shards"] == 3
    _, model, tok = tiny
    store = TeacherStore(run.logits_dir)
    assert store.temperature == 2.0 and store.vocab_size == model.config.vocab_size
    for p in encode_pairs(read_pairs(run.pairs), tok, student=False):
        with torch.no_grad():
            z = model(torch.tensor([p.teacher_prompt + p.solution_ids])).logits[0]  # [S, V] brute force
        P = len(p.teacher_prompt)
        ref = sparsify(z[P - 1 : P - 1 + p.solution_len], 16, 2.0)  # rows predicting solution_ids[0..L-1]
        got = store[p.id]
        assert got.ids.shape == (p.solution_len, 16)
        assert torch.equal(got.ids[:, :4], ref.ids[:, :4])  # ties below the top few may order differently
        torch.testing.assert_close(got.logprobs, ref.logprobs, atol=3e-3, rtol=1e-3)
        torch.testing.assert_close(got.log_tail, ref.log_tail, atol=1e-4, rtol=1e-4)
        assert got.log_tail.exp().max() > 0.01  # k=16 of 320: the tail bucket is not empty
    again = logits(cfg, run)  # finished with the same config and inputs: skipped, same counts
    assert again == counts


def test_logits_stage_auto_top_k_fills_a_kilobyte(tmp_path, tiny):
    from ssb.stages.logits import logits

    run, cfg = _run(tmp_path, tiny, n=2, **{"logits.top_k": 0})
    counts = logits(cfg, run)
    vocab = tiny[1].config.vocab_size
    assert counts["top_k"] == auto_top_k(vocab) == 249 < vocab  # 16-bit ids: (1000 - 4) // 4
    store = TeacherStore(run.logits_dir)
    assert store["arith-0"].ids.shape[1] == 249 and int(store["arith-0"].ids.max()) < vocab
    assert counts["bytes_per_token"] <= 1024  # on disk, shard header included


def test_hidden_store_reproduces_the_full_teacher_logits(tmp_path, tiny):
    from ssb.distill.loss import OutputHead
    from ssb.distill.pairs import encode_pairs, read_pairs
    from ssb.stages.logits import logits

    run, cfg = _run(tmp_path, tiny, n=3, **{"logits.store": "hidden"})
    counts = logits(cfg, run)
    _, model, tok = tiny
    assert counts["store"] == "hidden" and counts["bytes_per_token"] > 2 * model.config.hidden_size
    store, head = TeacherStore(run.logits_dir), OutputHead.of(model)
    for p in encode_pairs(read_pairs(run.pairs), tok, student=False):
        with torch.no_grad():
            z = model(torch.tensor([p.teacher_prompt + p.solution_ids])).logits[0]
            P = len(p.teacher_prompt)
            got = head.logits(store[p.id].states)
        torch.testing.assert_close(got, z[P - 1 : P - 1 + p.solution_len], atol=0.05, rtol=2e-3)


def test_logits_stage_resumes_after_a_kill(tmp_path, tiny, monkeypatch, capsys):
    from ssb.stages.logits import logits

    no_reference = {"logits.reference_pairs": 0}  # its few rows are rewritten whole, not resumed: not counted here
    run, cfg = _run(tmp_path, tiny, **no_reference)
    real_add, calls = TeacherStoreWriter.add, []

    def dying_add(self, eid, rows):
        calls.append(eid)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real_add(self, eid, rows)

    monkeypatch.setattr(TeacherStoreWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        logits(cfg, run)
    assert run.stage_entry("logits")["status"] == "failed"
    first = set(calls[:2])  # the first shard (2 examples) was written before the kill
    calls.clear()
    counts = logits(cfg, run)
    assert "resuming: 2 examples already stored, 3 to go" in capsys.readouterr().out
    assert len(calls) == 3 and not first & set(calls)
    assert counts["examples"] == 5
    fresh_run, _ = _run(tmp_path / "fresh", tiny, **no_reference)
    monkeypatch.setattr(TeacherStoreWriter, "add", real_add)
    logits(cfg, fresh_run)
    a, b = TeacherStore(run.logits_dir), TeacherStore(fresh_run.logits_dir)
    for eid in (f"arith-{i}" for i in range(5)):
        assert torch.equal(a[eid].ids, b[eid].ids) and torch.equal(a[eid].logprobs, b[eid].logprobs)


@pytest.mark.parametrize("sets", [{"logits.mode": "online"}, {"train.kd_weight": 0, "train.ce_weight": 1}])
def test_online_and_sft_store_nothing(tmp_path, tiny, sets):
    from ssb.stages.logits import logits

    run, cfg = _run(tmp_path, tiny, **sets)
    counts = logits(cfg, run)
    assert counts["mode"] == ("online" if "logits.mode" in sets else "none")
    assert not run.logits_dir.exists()


def test_bad_pairs_are_named_by_line_and_field(tmp_path, tiny):
    from ssb.distill.pairs import read_pairs

    run, _ = _run(tmp_path, tiny, n=2)
    lines = run.pairs.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["solution_ids"] = []
    run.pairs.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'solution_ids'"):
        read_pairs(run.pairs)
    bad = json.loads(lines[1])
    del bad["student_messages"]
    run.pairs.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'student_messages'"):
        read_pairs(run.pairs)
    run.pairs.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: field 'id': 'arith-0' already used on line 1"):
        read_pairs(run.pairs)
