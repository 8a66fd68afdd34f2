"""Shared fixtures: a tiny random chat model built once per test session (no network)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy CPU every OpenMP region of a 2-thread pool waits for a
    descheduled worker (measured 100x slower under load), so the suite runs torch single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from ssb.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def answering_model_dir(tmp_path_factory):
    """A tiny model trained (in seconds) to ignore the question and answer "The answer is 4." about 60% of the
    time and "The answer is 5." otherwise: with gold 4, rollouts are mixed, the teacher usually verifies, and
    every stage of the pipeline has real work to do."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssb.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("answering-model"), seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    rng = random.Random(0)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(80):
        ids, labels = [], []
        for _ in range(8):
            q = " ".join(
                rng.choice(["Tom", "has", "3", "apples", "How", "many", "?", "step", "wrong", "correct"])
                for _ in range(rng.randint(3, 16))
            )
            prompt = tok.apply_chat_template(
                [{"role": "system", "content": "You are a math tutor."}, {"role": "user", "content": q}],
                add_generation_prompt=True,
                tokenize=False,
            )
            answer = "The answer is 4." if rng.random() < 0.6 else "The answer is 5."
            p, a = (
                tok(prompt, add_special_tokens=False).input_ids,
                tok(answer + "<|im_end|>", add_special_tokens=False).input_ids,
            )
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, ids))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in ids])
        y = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return path
