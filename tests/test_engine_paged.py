"""The paged KV cache (ssb.engine.cache): same tokens as one segment per sequence (the old static cache) and as
HF generate on every claimed layout, the memory budget, the KV accounting, the token-based ETA, and the HF generate
fallback for other architectures."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import ssb.engine.cache as cache_module
from ssb.engine import Engine, SamplingParams, attention_kernel, tokenize_prompts
from ssb.engine.progress import expected_remaining_tokens
from ssb.engine.scheduler import MemoryBudgetError
from ssb.testing import make_tiny_tokenizer

LAYOUTS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": False}),
}
PROMPTS = [[{"role": "user", "content": "hi " * (1 + 7 * i)}] for i in range(5)]
MAX_NEW = 40


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def tiny_model(layout: str, tok):
    """A 2-layer random model of `layout` with large weights, so greedy text varies token to token."""
    config_cls, model_cls, extra = LAYOUTS[layout]
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=g) * (1.0 if "embed" in name else w.shape[1] ** -0.5))
            elif "bias" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def hf_greedy(model, tok, messages, stop_ids):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=MAX_NEW,
        do_sample=False,
        eos_token_id=sorted(stop_ids),
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("attention", ["kernel", "torch"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_paged_cache_matches_static_cache_and_hf_generate(layout, attention, tok, monkeypatch):
    """Segments of 4 positions, generated and prompt (each sequence spans up to 10 generation pools and its prompt
    up to 9 prompt pools, slots reused as sequences finish) give the same greedy tokens as one segment holding
    every position (the static layout) and as HF generate; sampled tokens (3 samples sharing a prompt) agree too.
    Both decode-attention paths: the fused CPU kernel (ssb.engine.attention_kernel) and torch ops."""
    if attention == "torch":
        monkeypatch.setattr(attention_kernel, "load", lambda: None)
    elif attention_kernel.load() is None:
        pytest.skip("the decode-attention kernel did not build here")
    model = tiny_model(layout, tok)
    greedy = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    sampled = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=MAX_NEW, seed=3)
    engine = Engine(model, tok, batch_size=3, progress=False)
    monkeypatch.setattr(cache_module, "SEGMENT", 4)
    monkeypatch.setattr(cache_module, "PROMPT_SEGMENT", 4)
    paged = [c[0].token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    paged_samples = [[c.token_ids for c in cs] for cs in engine.generate(PROMPTS, 3, sampled)]
    monkeypatch.setattr(cache_module, "SEGMENT", MAX_NEW)
    monkeypatch.setattr(cache_module, "PROMPT_SEGMENT", 512)
    static = [c[0].token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    assert paged == static
    assert paged_samples == [[c.token_ids for c in cs] for cs in engine.generate(PROMPTS, 3, sampled)]
    for messages, got in zip(PROMPTS, paged):
        assert got == hf_greedy(model, tok, messages, engine.stop_ids)
    assert len({t for seq in paged for t in seq}) > 10  # non-degenerate text


def test_kv_accounting_follows_the_tokens(tok, monkeypatch):
    """Allocated KV stays within 1.5x of the peak in use (segments of 8, sequences of up to 40 tokens, prompts of
    similar lengths as in the stages), and the old static layout (every row at max_new_tokens) needed more."""
    model = tiny_model("llama", tok)
    monkeypatch.setattr(cache_module, "SEGMENT", 8)
    engine = Engine(model, tok, batch_size=4, progress=False)
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=1)
    questions = [[{"role": "user", "content": f"Question {i}: how many apples are left?"}] for i in range(10)]
    out = engine.generate(questions, 2, params)
    s = engine.last_stats
    assert s["tokens"] == sum(c.num_tokens for r in out for c in r)
    assert 0 < s["kv_bytes_used"] <= s["kv_bytes_allocated"] <= 1.5 * s["kv_bytes_used"]
    token_bytes = cache_module.kv_token_bytes(model, torch.float32)
    assert token_bytes == 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x fp32
    longest_prompt = max(len(ids) for ids in tokenize_prompts(tok, questions))
    static = token_bytes * 4 * (MAX_NEW * 1.25 + longest_prompt)
    assert s["kv_bytes_allocated"] < static


def test_pools_that_grow_by_copying_give_the_same_tokens(tok, monkeypatch):
    """The pools of devices that commit what they allocate (CUDA) grow by copying; run that path here: the same
    greedy tokens as the CPU pools, and allocated KV (growth copies included) within 1.5x of the peak in use."""
    import ssb.engine.pools as pools_module

    model = tiny_model("llama", tok)
    monkeypatch.setattr(cache_module, "SEGMENT", 4)
    monkeypatch.setattr(cache_module, "PROMPT_SEGMENT", 4)
    greedy = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    engine = Engine(model, tok, batch_size=3, progress=False)
    lazy = [c[0].token_ids for c in engine.generate(PROMPTS, 1, greedy)]
    monkeypatch.setattr(pools_module, "LAZY_ON_CPU", False)
    assert [c[0].token_ids for c in engine.generate(PROMPTS, 1, greedy)] == lazy
    questions = [[{"role": "user", "content": f"Question {i}: how many apples are left?"}] for i in range(10)]
    engine.generate(questions, 2, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=1))
    s = engine.last_stats
    assert 0 < s["kv_bytes_used"] <= s["kv_bytes_allocated"] <= 1.5 * s["kv_bytes_used"]


def test_kv_accounting_with_prompts_of_very_different_lengths(tok, monkeypatch):
    """Teach's case: prompts of 20 to about 380 tokens. The paged prompt cache holds each prompt's own length (rounded
    up to a segment), so allocated KV stays within 1.5x of the peak in use; one prompt slot as long as the longest
    prompt for every prompt (the layout before prompt segments) allocates more than 1.5x what is used."""
    model = tiny_model("llama", tok)
    monkeypatch.setattr(cache_module, "SEGMENT", 8)
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1)
    questions = [[{"role": "user", "content": "hi " * (1 if i % 4 else 120)}] for i in range(16)]
    lengths = [len(ids) for ids in tokenize_prompts(tok, questions)]
    assert min(lengths) <= 20 and max(lengths) > 300
    ratios = {}
    for prompt_segment in (16, 512):
        monkeypatch.setattr(cache_module, "PROMPT_SEGMENT", prompt_segment)
        engine = Engine(model, tok, batch_size=8, progress=False)
        engine.generate(questions, 1, params)
        s = engine.last_stats
        ratios[prompt_segment] = s["kv_bytes_allocated"] / s["kv_bytes_used"]
    assert ratios[16] <= 1.25 and ratios[512] > 1.5, ratios


def test_budget_limits_rows_and_rejects_a_budget_below_one_sequence(tok):
    model = tiny_model("llama", tok)
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW)
    reference = Engine(model, tok, batch_size=8, progress=False).generate(PROMPTS, 1, params)
    longest = max(len(ids) for ids in tokenize_prompts(tok, PROMPTS))
    # one segment (64 positions, or max_new_tokens if shorter) + its prompt + the copy while a pool grows
    seg = min(64, MAX_NEW)
    one_row_mib = 2 * 2 * 2 * 16 * 4 * (seg + longest + max(seg, longest)) / 2**20
    small = Engine(model, tok, batch_size=8, progress=False, kv_budget_mib=2.5 * one_row_mib)
    assert [c[0].token_ids for c in small.generate(PROMPTS, 1, params)] == [c[0].token_ids for c in reference]
    assert small.last_stats["rows"] == 2 and small.last_stats["rows_limited_by_budget"]
    assert small.last_stats["kv_bytes_allocated"] <= small.kv_budget_bytes
    tiny_budget = Engine(model, tok, batch_size=8, progress=False, kv_budget_mib=0.01)
    with pytest.raises(MemoryBudgetError, match=r"budget \(0\.0 MiB, config key generation_memory_mib\) is smaller"):
        tiny_budget.generate(PROMPTS, 1, params)


def test_eta_from_tokens_on_a_synthetic_schedule():
    """10 sequences of 100 tokens, 2 at a time: after the first two finish, the remaining work is known exactly
    (the other 8 x 100 minus what the running two have done); an ETA from finished items would say 4x the
    elapsed time whatever the lengths."""
    assert expected_remaining_tokens([100, 100], [30, 30], 6, 512) == 6 * 100 + 2 * 70
    # before anything finished: max_new_tokens is the bound
    assert expected_remaining_tokens([], [10], 2, 64) == 54 + 2 * 64
    # a running sequence is expected to reach the mean of the finished lengths longer than its own
    assert expected_remaining_tokens([10, 20, 100, 200], [50], 0, 512) == 150 - 50
    assert expected_remaining_tokens([10, 20], [50], 0, 512) == 512 - 50  # nothing finished longer: the bound

    # simulate: 2 slots, lengths 100 each, one token per step per slot; the ETA at each finish is exact
    lengths, finished, step = [100] * 10, [], 0
    running, waiting = [0, 0], 8
    while running:
        step += 1
        running = [x + 1 for x in running]
        for x in [x for x in running if x == 100]:
            finished.append(x)
            running.remove(x)
            if waiting:
                running.append(0)
                waiting -= 1
        if finished and running:
            truth = sum(lengths) - 100 * len(finished) - sum(running)
            assert expected_remaining_tokens(sorted(finished), running, waiting, 512) == truth


def test_unsupported_architecture_falls_back_to_hf_generate(tok, capsys):
    """A model type the engine does not implement (here GPT-2) is generated by HF generate through the same
    contract, with a one-line message: the same greedy tokens as generate itself, never a wrong answer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=tok.eos_token_id
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    engine = Engine(model, tok, batch_size=4, progress=False)
    assert "not 'gpt2'" in capsys.readouterr().out and engine.backend == "hf-generate/float32"
    prompts = PROMPTS + [PROMPTS[0]]  # two prompts of the same length share a batch
    got = engine.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=MAX_NEW))
    for messages, comps in zip(prompts, got):
        assert comps[0].token_ids == hf_greedy(model, tok, messages, engine.stop_ids)
        assert comps[0].num_tokens == len(comps[0].token_ids)
    sampled = engine.generate(PROMPTS[:2], 3, SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8, seed=2))
    assert [len(c) for c in sampled] == [3, 3] and all(0 < x.num_tokens <= 8 for c in sampled for x in c)
    assert engine.last_stats["tokens"] == sum(x.num_tokens for c in sampled for x in c)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pages are given back with Linux's madvise")
def test_compaction_moves_live_slots_down_and_gives_the_pages_back():
    """64 owners fill a CPU pool, the 48 in the lowest slots finish: compaction moves the other 16 into slots 0-15
    with their KV, the pool's touched slots and the meter drop to 16, and the process's resident memory falls by
    about the freed slots' bytes."""
    from ssb.engine.pools import KVMeter, SegmentPools
    from ssb.memory import current_rss_bytes, release_free_memory

    layers, heads, length, head_dim = 8, 2, 64, 128
    slot_bytes = 2 * layers * heads * length * head_dim * 4  # K and V, every layer
    meter = KVMeter()
    pools = SegmentPools(1, length, (layers, heads, head_dim), torch.float32, "cpu", meter)
    pools.limit = 64
    for owner in range(64):
        slot = pools.take(0, owner)
        pools.k[0][:, slot] = owner
        pools.v[0][:, slot] = -owner
    assert meter.allocated == 64 * slot_bytes
    for owner in range(48):
        pools.release(owner)
    release_free_memory()
    before = current_rss_bytes()
    pools.compact()
    release_free_memory()  # the copy's temporary goes back to the OS too: RSS then shows the pool's pages
    freed = before - current_rss_bytes()
    assert pools.touched[0] == 16 and meter.allocated == 16 * slot_bytes
    assert sorted(pools.slots_of) == list(range(48, 64))
    for owner, (slot,) in pools.slots_of.items():
        assert slot < 16 and pools.owner[0][slot] == owner
        assert bool((pools.k[0][:, slot] == owner).all()) and bool((pools.v[0][:, slot] == -owner).all())
    assert freed > 0.9 * 48 * slot_bytes, (freed, 48 * slot_bytes)
    slot = pools.take(0, 99)  # a slot above the compacted top is zeroed again when taken
    assert slot == 16 and not pools.k[0][:, slot].any() and pools.touched[0] == 17


def test_compaction_keeps_the_tokens(tok, monkeypatch):
    """Generation with pools compacted whenever a slot is free gives the tokens of generation without compaction
    (segments of 4 positions, 3 samples per prompt finishing at different steps)."""
    import ssb.engine.pools as pools_module

    model = tiny_model("llama", tok)
    monkeypatch.setattr(cache_module, "SEGMENT", 4)
    monkeypatch.setattr(cache_module, "PROMPT_SEGMENT", 4)
    sampled = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=MAX_NEW, seed=1)  # 5 to 40 tokens
    engine = Engine(model, tok, batch_size=6, progress=False)
    compactions, give_back = [], pools_module._give_back_pages
    monkeypatch.setattr(
        pools_module, "_give_back_pages", lambda x, lo, hi: compactions.append(1) or give_back(x, lo, hi)
    )
    runs = {}
    for share in (2.0, 0.0):  # 2: never compact; 0: compact at every chance (2 or more free slots)
        monkeypatch.setattr(pools_module, "COMPACT_FREE_SHARE", share)
        runs[share] = [[c.token_ids for c in cs] for cs in engine.generate(PROMPTS, 3, sampled)]
        assert bool(compactions) == (share == 0.0)
    assert runs[0.0] == runs[2.0]
    assert len({len(t) for cs in runs[0.0] for t in cs}) > 3  # samples finish at different steps


def test_compaction_is_off_where_pages_cannot_be_given_back(monkeypatch):
    """Without madvise (not Linux) moving slots would free nothing: `compact` leaves the pool as it is."""
    import ssb.engine.pools as pools_module

    monkeypatch.setattr(pools_module, "CAN_GIVE_BACK_PAGES", False)
    meter = pools_module.KVMeter()
    pools = pools_module.SegmentPools(1, 4, (2, 1, 8), torch.float32, "cpu", meter)
    pools.limit = 8
    for owner in range(8):
        pools.take(0, owner)
    for owner in range(6):
        pools.release(owner)
    allocated, slots = meter.allocated, {o: list(s) for o, s in pools.slots_of.items()}
    pools.compact()
    assert pools.touched[0] == 8 and meter.allocated == allocated and pools.slots_of == slots
