"""Slow tier: the real embedded SmolLM2-135M-Instruct (`pytest -m slow`). Minutes on a 2-core CPU."""

import pytest

from ssb.config import EMBEDDED_MODEL, load_config
from ssb.files import read_jsonl
from ssb.rundir import RunDir

pytestmark = pytest.mark.slow


def test_embedded_model_loads_with_chat_template():
    from ssb.models import load_model, load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL)
    model = load_model(EMBEDDED_MODEL)
    assert model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_rollout_and_curate_on_the_embedded_model(tmp_path):
    from ssb.stages.curate import curate
    from ssb.stages.rollout import rollout

    cfg = load_config(None, ["data.train.limit=16", "rollout.max_new_tokens=160", "rollout.batch_size=32"])
    run = RunDir(tmp_path / "run").mkdir()
    counts = rollout(cfg, run)
    recs = read_jsonl(run.rollouts)
    assert counts["rollouts"] == 64 and len(recs) == 16
    rolls = [r for rec in recs for r in rec["rollouts"]]
    assert all(r["text"].strip() for r in rolls)
    assert sum(r["extracted"] is not None for r in rolls) > 0.8 * len(rolls)  # the model answers in a readable form
    funnel = curate(cfg, run)
    assert funnel["mixed"] + funnel["all_correct"] + funnel["all_wrong"] + funnel["unparsed"] == 16
