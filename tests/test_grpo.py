"""The GRPO baseline on a tiny random model: the verifier reward on handmade completions, a 2-step run that writes
a loadable adapter and consistent metrics, learning when rewards vary, and resuming from a checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ssb.config import ConfigError, load_config
from ssb.files import read_jsonl
from ssb.rundir import RunDir
from ssb.stages import grpo as grpo_mod
from ssb.stages.grpo import completion_text, grpo, verifier_reward


def _cfg(model_dir, *extra):
    # 4 arith questions, 2 questions x 2 completions per step, 2 steps of at most 8 tokens
    return load_config(
        overrides=[
            f"model={model_dir}",
            "data.train.limit=4",
            "grpo.num_generations=2",
            "grpo.batch_size=2",
            "grpo.max_steps=2",
            "grpo.max_completion_length=8",
            "grpo.save_steps=1",
            "train.lora_r=4",
            "train.lora_alpha=8",
            *extra,
        ]
    )


def _msg(text):
    return [{"role": "assistant", "content": text}]


def test_verifier_reward_on_handmade_completions():
    completions = [
        _msg("3 + 4 = 7. So the answer is \\boxed{7}."),
        _msg("I think it is \\boxed{8}."),
        _msg("no idea"),
        _msg("#### 1,250"),
        _msg("\\boxed{\\frac{1}{2}}"),
        "plain text: \\boxed{7}",
    ]
    gold = ["7", "7", "7", "1250", "0.5", "7"]
    assert verifier_reward(completions, gold) == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # the boxed policy ignores an unboxed final answer
    assert verifier_reward([_msg("The answer is 7")], ["7"], policy="lenient") == [1.0]
    assert verifier_reward([_msg("The answer is 7")], ["7"], policy="boxed") == [0.0]
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"


def test_config_rejects_a_group_of_one():
    with pytest.raises(ConfigError, match="grpo.num_generations"):
        load_config(overrides=["grpo.num_generations=1"])


def _check_metrics_match_meter(rows, per_step):
    """generated_tokens (our count, from the reward function) agrees with TRL's mean completion length."""
    prev = 0
    for r in rows:
        assert r["generated_tokens"] - prev == pytest.approx(r["completion_len"] * per_step)
        prev = r["generated_tokens"]


def test_grpo_two_steps_writes_adapter_and_metrics(tmp_path, tiny_model_dir):
    from ssb.models import load_model

    run = RunDir(tmp_path / "run")
    counts = grpo(_cfg(tiny_model_dir, "grpo.beta=0.01"), run)
    out = run.root / "grpo"
    assert counts["steps"] == 2 and counts["questions"] == 4
    assert counts["completions"] == 2 * 2 * 2  # steps x questions per step x completions per question
    assert 0 < counts["generated_tokens"] <= counts["completions"] * 8
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0 and r["kl"] is not None and r["loss"] is not None
    _check_metrics_match_meter(rows, per_step=4)
    assert rows[-1]["generated_tokens"] == counts["generated_tokens"]
    entry = run.stage_entry("grpo")
    assert entry["status"] == "done" and entry["counts"]["generated_tokens"] == counts["generated_tokens"]
    assert entry["generation"]["backend"].startswith("torch-paged-kv/")  # which generator sampled, as in rollout
    import trl.trainer.utils as trl_utils

    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 8192  # narrow log-prob tiles on CPU (GRPO's memory peak)

    base = json.loads((out / "adapter" / "ssb_base.json").read_text())
    assert base == {"model": str(tiny_model_dir), "trust_remote_code": False}
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert set(adapter_cfg["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert type(load_model(str(out / "adapter"), merge=False)).__name__ == "PeftModelForCausalLM"
    merged, unmerged = load_model(str(out / "adapter")), load_model(str(out / "adapter"), merge=False)
    assert "Peft" not in type(merged).__name__  # merged for inference: same function, fewer matmuls
    ids = torch.tensor([[1, 5, 9, 3]])
    torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, rtol=1e-4, atol=1e-4)
    # a finished stage is skipped on a rerun with the same config
    assert grpo(_cfg(tiny_model_dir, "grpo.beta=0.01"), run) == counts


def test_grpo_learns_from_varying_rewards_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    # A random tiny model never answers correctly, so every reward is 0 and the policy gradient is zero. To see
    # that rewards reach the update, score completions by a fixed rule: the first of each pair gets 1, the other 0.
    calls = []

    def alternating(completions, gold, policy="lenient", **kw):
        calls.append(len(completions))
        return [float(i % 2 == 0) for i in range(len(completions))]

    monkeypatch.setattr(grpo_mod, "verifier_reward", alternating)
    run = RunDir(tmp_path / "run")
    cfg = _cfg(tiny_model_dir, "grpo.generation=trl")  # TRL's own generate here; the other tests use ours
    first = grpo(cfg, run)
    out = run.root / "grpo"
    rows = read_jsonl(out / "metrics.jsonl")
    assert calls == [4, 4]
    assert all(r["reward"] == pytest.approx(0.5) and r["reward_std"] > 0 and r["grad_norm"] > 0 for r in rows)
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: nonzero means it learned

    # Simulate a kill after the step-1 checkpoint: resume continues from it and recounts nothing twice.
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    shutil.rmtree(out / "adapter")
    run.update_stage("grpo", status="failed")
    calls.clear()
    second = grpo(cfg, run)
    assert calls == [4]  # only step 2 was generated again
    assert run.stage_entry("grpo")["resumed"] is True
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    _check_metrics_match_meter(rows, per_step=4)
    assert second["steps"] == 2 and second["completions"] == first["completions"] == 8
    assert second["generated_tokens"] == rows[-1]["generated_tokens"]
    assert second["train_loss"] == pytest.approx(sum(r["loss"] for r in rows) / 2, abs=1e-6)  # both steps
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_policy_rollout_samples_each_group_from_one_prompt(tiny_model_dir):
    """The rollout_func TRL calls: one completion per (repeated) prompt, prompt ids = the chat template's, fresh
    samples at the next optimizer step."""
    from ssb.engine.policy import PolicyRollout
    from ssb.models import load_model, load_tokenizer
    from ssb.testing import fake_grpo_trainer

    cfg = _cfg(tiny_model_dir, "grpo.max_completion_length=6")
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    trainer = fake_grpo_trainer(model, tok, num_generations=2)
    a, b = ([{"role": "user", "content": q}] for q in ("What is 2 + 2?", "What is 3 + 5?"))
    rollout = PolicyRollout(cfg)
    out = rollout([a, a, b, b], trainer)
    assert set(out) == {"prompt_ids", "completion_ids", "logprobs"} and len(out["completion_ids"]) == 4
    want = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for m in (a, a, b, b)
    ]
    assert out["prompt_ids"] == want
    assert all(1 <= len(c) <= 6 for c in out["completion_ids"])
    assert out["completion_ids"][0] != out["completion_ids"][1]  # two samples of one group, not one copied
    assert rollout([a, a, b, b], trainer) == out  # seeded
    trainer.state.global_step = 1
    assert rollout([a, a, b, b], trainer)["completion_ids"] != out["completion_ids"]
    # prompts that are not in groups of num_generations still get one completion each
    assert len(rollout([a, b, a], trainer)["completion_ids"]) == 3
