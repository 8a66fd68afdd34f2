"""Tests for the batched generation engine (ssb.engine) on the tiny random chat model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssb.engine.engine import Completion, Engine, SamplingParams
from ssb.engine.sampling import sample_next
from ssb.engine.scheduler import ThreadTuner
from ssb.testing import make_tiny_model

# Prompts of very different lengths (the long one is ~10x the short one in tokens).
MESSAGES = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "You are a helpful math tutor."},
        {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have now? " * 3},
    ],
    [{"role": "user", "content": "Solve for x: 2x + 3 = 11."}],
    [{"role": "user", "content": "A train travels 60 miles in 2 hours. What is its speed?"}],
    [{"role": "user", "content": "12 - 5 = ?"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with larger random weights and an untied lm_head, so greedy text varies token to token
    (the default init mostly repeats one token, which would make equality tests weak)."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2:
                scale = 1.0 if "embed" in name else w.shape[1] ** -0.5
                w.copy_(torch.randn(w.shape, generator=g) * scale)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=g) * 0.5)
    return model, tok


def prompt_ids(tok, messages):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, tok, ids, max_new, stop_ids):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(stop_ids),
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


def test_greedy_matches_hf_generate(tiny):
    model, tok = tiny
    # batch_size 2 < 5 prompts: exercises slot refill and compaction
    eng = Engine(model, tok, batch_size=2, progress=False)
    got = eng.generate(MESSAGES, 1, GREEDY)
    for m, comps in zip(MESSAGES, got):
        ref = hf_greedy(model, tok, prompt_ids(tok, m), GREEDY.max_new_tokens, eng.stop_ids)
        assert comps[0].token_ids == ref
        assert len(set(ref)) > 5  # non-degenerate text


def test_batch_and_padding_invariance(tiny):
    model, tok = tiny
    together = Engine(model, tok, batch_size=16, progress=False).generate(MESSAGES, 1, GREEDY)
    for i, m in enumerate(MESSAGES):
        alone = Engine(model, tok, batch_size=1, progress=False).generate([m], 1, GREEDY)
        assert alone[0][0].token_ids == together[i][0].token_ids
    # token-id prompts are accepted and give the same result as the chat messages they render to
    ids = [prompt_ids(tok, m) for m in MESSAGES]
    by_ids = Engine(model, tok, batch_size=3, progress=False).generate(ids, 1, GREEDY)
    assert [c[0].token_ids for c in by_ids] == [c[0].token_ids for c in together]


def test_samples_in_order_with_one_callback_per_prompt(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    calls = []
    eng = Engine(model, tok, batch_size=4, progress=False)
    got = eng.generate(MESSAGES, 3, params, callback=lambda i, comps: calls.append((i, comps)))
    assert sorted(i for i, _ in calls) == list(range(len(MESSAGES)))
    for i, comps in calls:
        assert comps is got[i] or comps == got[i]
    assert all(len(c) == 3 and all(isinstance(x, Completion) for x in c) for c in got)
    # sample j of a prompt is the same whether the prompt runs alone or among others (per-sample seeded streams)
    for i in (0, 1):
        alone = Engine(model, tok, batch_size=2, progress=False).generate([MESSAGES[i]], 3, params)
        assert [c.token_ids for c in alone[0]] == [c.token_ids for c in got[i]]
    assert len({tuple(c.token_ids) for c in got[1]}) > 1  # the samples differ from each other


def test_finish_reasons_and_text(tiny):
    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def bias_eos(module, args, out):  # makes the end-of-turn token win after a few tokens on some prompts
        out[..., eos] += 5.5
        return out

    handle = model.lm_head.register_forward_hook(bias_eos)
    try:
        eng = Engine(model, tok, batch_size=3, progress=False)
        assert eos in eng.stop_ids
        got = [c[0] for c in eng.generate(MESSAGES, 1, GREEDY)]
        refs = [hf_greedy(model, tok, prompt_ids(tok, m), GREEDY.max_new_tokens, eng.stop_ids) for m in MESSAGES]
    finally:
        handle.remove()
    assert [c.token_ids for c in got] == refs
    stopped = [c for c in got if c.finish_reason == "stop"]
    assert any(c.num_tokens > 1 for c in stopped) and any(c.finish_reason == "length" for c in got)
    for c in got:
        assert c.num_tokens == len(c.token_ids)
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1] and c.num_tokens <= GREEDY.max_new_tokens
            assert c.text == tok.decode(c.token_ids[:-1]) and "<|im_end|>" not in c.text
        else:
            assert c.num_tokens == GREEDY.max_new_tokens and eos not in c.token_ids
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_scheduling_with_early_stops_matches_one_big_batch(tiny):
    """Many prompts of different lengths, samples stopping at different times (holes, compaction, refill,
    attention chunks) give exactly what a batch holding every sequence at once gives."""
    model, tok = tiny
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    handle = model.lm_head.register_forward_hook(
        lambda m, a, out: out.index_add_(-1, torch.tensor([eos]), torch.full(out.shape[:-1] + (1,), 4.0))
    )
    prompts = [[{"role": "user", "content": f"Question {i}: " + "how many apples? " * (i % 4 * 3)}] for i in range(9)]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=20, seed=7)
    try:
        small = Engine(model, tok, batch_size=5, progress=False).generate(prompts, 3, params)
        big = Engine(model, tok, batch_size=64, progress=False).generate(prompts, 3, params)
    finally:
        handle.remove()
    assert [[c.token_ids for c in r] for r in small] == [[c.token_ids for c in r] for r in big]
    lengths = {c.num_tokens for r in big for c in r}
    assert len(lengths) > 5 and {c.finish_reason for r in big for c in r} == {"stop", "length"}


def test_top_k_1_is_greedy_and_greedy_n_copies(tiny):
    model, tok = tiny
    eng = Engine(model, tok, batch_size=8, progress=False)
    greedy = eng.generate(MESSAGES, 2, GREEDY)
    topk1 = eng.generate(MESSAGES, 2, SamplingParams(temperature=0.7, top_k=1, max_new_tokens=24, seed=5))
    for g, t in zip(greedy, topk1):
        assert g[0].token_ids == g[1].token_ids == t[0].token_ids == t[1].token_ids


def test_seeded_reproducibility(tiny):
    model, tok = tiny
    eng = Engine(model, tok, batch_size=5, progress=False)
    p = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=16, seed=11)
    a = eng.generate(MESSAGES, 2, p)
    b = eng.generate(MESSAGES, 2, p)
    c = eng.generate(MESSAGES, 2, SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=16, seed=12))
    ids = lambda r: [[x.token_ids for x in comps] for comps in r]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_lora_model_matches_hf_generate_and_training_mode_is_restored(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.5, init_lora_weights=False
    )  # random (non-identity) adapters, dropout that eval must disable
    torch.manual_seed(0)
    peft_model = get_peft_model(model, cfg)
    try:
        peft_model.train()
        eng = Engine(peft_model, tok, batch_size=2, progress=False)
        got = eng.generate(MESSAGES[:3], 1, GREEDY)
        assert peft_model.training
        peft_model.eval()
        base_out = []
        for m, comps in zip(MESSAGES[:3], got):
            ids = prompt_ids(tok, m)
            assert comps[0].token_ids == hf_greedy(peft_model, tok, ids, GREEDY.max_new_tokens, eng.stop_ids)
            with peft_model.disable_adapter():
                base_out.append(hf_greedy(peft_model, tok, ids, GREEDY.max_new_tokens, eng.stop_ids))
        assert base_out != [c[0].token_ids for c in got]  # the adapter changed the outputs
    finally:
        peft_model.unload()


def test_bf16_weights_track_the_fp32_model(tiny):
    """A bf16 copy (the CPU generation default where bf16 matmuls are fast): the KV caches follow the weights
    unless told otherwise, results do not depend on the batch, the backend names the dtype, and nearly every
    greedy token is the fp32 model's argmax."""
    import copy

    from ssb.engine.cache import SlotModel

    model, tok = tiny
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    eng = Engine(m16, tok, batch_size=16, progress=False)
    assert eng.backend == "torch-paged-kv/bfloat16"
    assert Engine(model, tok, progress=False).backend == "torch-paged-kv/float32"
    assert SlotModel(m16, 8, 8).kv_dtype == torch.bfloat16
    assert SlotModel(m16, 8, 8, kv_dtype=torch.float32).kv_dtype == torch.float32
    together = eng.generate(MESSAGES, 1, GREEDY)
    for m, comps in zip(MESSAGES, together):
        assert (
            Engine(m16, tok, batch_size=1, progress=False).generate([m], 1, GREEDY)[0][0].token_ids
            == comps[0].token_ids
        )
    agree = total = 0
    for m, comps in zip(MESSAGES, together):  # teacher-forced: fp32 argmax at each generated position
        ids, toks = prompt_ids(tok, m), comps[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids + toks])).logits[0, len(ids) - 1 : -1]
        agree += int((logits.argmax(-1) == torch.tensor(toks)).sum())
        total += len(toks)
    assert agree >= 0.9 * total  # measured 118 of 120


def test_generation_dtype_resolution(monkeypatch, tmp_path):
    from ssb import models
    from ssb.config import load_config
    from ssb.models import load_from_config, resolve_generation_dtype

    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert resolve_generation_dtype("auto", "auto", "cpu") == torch.bfloat16
    assert resolve_generation_dtype("model", "auto", "cpu") == torch.float32
    assert resolve_generation_dtype("float32", "bfloat16", "cpu") == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert resolve_generation_dtype("auto", "auto", "cpu") == torch.float32
    assert resolve_generation_dtype("auto", "bfloat16", "cpu") == torch.bfloat16  # falls back to `dtype`
    path = make_tiny_model(tmp_path / "tiny")
    cfg = load_config(None, ["model=" + str(path), "device=cpu", "generation_dtype=bfloat16"])
    assert next(load_from_config(cfg, generation=True)[0].parameters()).dtype == torch.bfloat16
    assert next(load_from_config(cfg)[0].parameters()).dtype == torch.float32  # training and logits: `dtype`


def test_fast_bf16_rule_measures_avx512_bf16_cpus(monkeypatch):
    from ssb import models

    def cpu(amx: bool, avx512_bf16: bool, speedup: float):
        models.cpu_has_fast_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        measured = []
        monkeypatch.setattr(models, "bf16_matmul_speedup", lambda: measured.append(1) or speedup)
        return models.cpu_has_fast_bf16(), len(measured)

    try:
        assert cpu(amx=True, avx512_bf16=True, speedup=0.5) == (True, 0)  # AMX: bf16 without measuring
        assert cpu(amx=False, avx512_bf16=True, speedup=4.0) == (True, 1)  # as measured on AMD Zen 4
        assert cpu(amx=False, avx512_bf16=True, speedup=0.7) == (False, 1)  # bf16 instructions, slow kernels
        assert cpu(amx=False, avx512_bf16=False, speedup=9.0) == (False, 0)  # emulated bf16
    finally:
        models.cpu_has_fast_bf16.cache_clear()


def test_bf16_matmul_speedup_is_a_positive_ratio():
    from ssb.models import bf16_matmul_speedup

    assert bf16_matmul_speedup(rows=8, d_in=16, d_out=16, repeats=2) > 0


def test_bad_prompts_are_rejected(tiny):
    model, tok = tiny
    eng = Engine(model, tok, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        eng.generate([[1, 2, 3], [{"role": "user", "content": "x"}, 5]], 1, GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\]"):
        eng.generate([[{"content": "x"}]], 1, GREEDY)
    with pytest.raises(ValueError, match="n must be"):
        eng.generate([[1, 2]], 0, GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[1\]: token id out of range"):
        eng.generate([[1, 2], [1, 10**6]], 1, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[1, 2]], 1, SamplingParams(top_p=0.0))


def test_sampling_distribution():
    torch.manual_seed(0)
    rows = 200_000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    u = torch.rand(rows, dtype=torch.float64)

    def freqs(**kw):
        tokens = sample_next(logits.expand(rows, -1), u, **kw)
        return torch.bincount(tokens, minlength=5).double() / rows

    def close(observed, expected):
        assert torch.allclose(observed, expected.double(), atol=4e-3), (observed, expected)

    close(freqs(temperature=1.0), torch.softmax(logits, -1))
    close(freqs(temperature=0.5), torch.softmax(logits / 0.5, -1))
    top2 = torch.softmax(logits[:2], -1)
    close(freqs(temperature=1.0, top_k=2), torch.cat([top2, torch.zeros(3)]))
    # top_p=0.8: probs are .563,.207,.126,.076,.028; mass before each is 0,.563,.770,.896 -> keep first three
    p = torch.softmax(logits, -1)
    kept = torch.cat([p[:3] / p[:3].sum(), torch.zeros(2)])
    close(freqs(temperature=1.0, top_p=0.8), kept)
    close(freqs(temperature=1.0, top_k=4, top_p=0.8), kept)
    assert (sample_next(logits.expand(3, -1), u[:3], temperature=0.0) == 0).all()
    with pytest.raises(ValueError):
        sample_next(logits[None], u[:1], temperature=1.0, top_p=0.0)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf_generate():
    from ssb.models import EMBEDDED_MODEL, resolve

    path = resolve(EMBEDDED_MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    system = {"role": "system", "content": "You are a helpful math tutor. Solve the problem step by step."}
    prompts = [
        [system, {"role": "user", "content": q}]
        for q in [
            "What is 12 * 7?",
            "Tom has 3 apples and buys 4 more. How many does he have?",
            "A train travels 60 miles in 2 hours. What is its average speed in miles per hour?",
        ]
    ]
    eng = Engine(model, tok, batch_size=8, progress=False)
    got = eng.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=48))
    for m, comps in zip(prompts, got):
        assert comps[0].token_ids == hf_greedy(model, tok, prompt_ids(tok, m), 48, eng.stop_ids)


def test_thread_tuner_keeps_the_faster_thread_count_and_restores(monkeypatch):
    """Trial steps alternate the caller's count and 1; the faster (median per row) runs until the next trial."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    tuner = ThreadTuner(period=10, trial=3)
    used = []
    for slow_threads in (2, 1):  # first period: 2 threads are slow (a busy machine); second: 1 thread is
        for _ in range(10):
            tuner.before_step()
            used.append(tuner.current)
            tuner.after_step(1.0 if tuner.current == slow_threads else 0.1)
    assert used[:6] == [2, 1, 2, 1, 2, 1] and set(used[6:10]) == {1}  # trial, then the faster: 1
    assert used[10:16] == [2, 1, 2, 1, 2, 1] and set(used[16:]) == {2}  # conditions changed: back to 2
    tuner.restore()
    assert calls[-1] == 2
