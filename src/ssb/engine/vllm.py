"""Generation through vLLM, with the contract and records of `ssb.engine.Engine` (chosen by `generation_backend`).

`VllmGenerator(model_dir, tokenizer, ...).generate(prompts, n, params, callback)` returns n `Completion`s per
prompt, like the engine: prompts are tokenised by ssb (`tokenize_prompts`, so both backends see the same ids), the
same stop ids end a sequence (`stop_token_ids`), `token_ids` include the final stop token, `finish_reason` is
'stop' when the last token is a stop id else 'length', and the text is decoded by ssb's tokenizer the way the
engine decodes it. `backend` reads like "vllm-0.32.0/float32".

Seeds: each request gets its own seed derived from (params.seed, prompt ids), so a prompt's samples do not depend
on which other prompts share the call and a resumed run redraws the same samples. vLLM draws them from its own
random stream, so they differ from the engine's samples for the same seed (greedy decoding agrees up to
floating-point ties). On CPU, per-request seeds need chunked prefill off (vLLM 0.32 raises "CPU Generator does not
use offset" when a seeded prompt's prefill is split), so it is turned off there.

The vLLM engine is started lazily on the first `generate` call, when the longest prompt is known: its KV cache is
sized for min(batch_size, prompts x samples) sequences of (longest prompt + max_new_tokens) tokens
(`kv_cache_bytes`), or `kv_cache_gib` when set. vLLM is imported only here; docs/vllm.md covers installing it
and what was measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ssb import parallel
from ssb.engine.engine import request_ids, stop_token_ids
from ssb.engine.sampling import SamplingParams
from ssb.engine.scheduler import Completion

GIB = 1 << 30


class TokenizerlessWarmupFilter(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning when its cause is `skip_tokenizer_init`: vLLM 0.32's
    renderer warms a chat template up even when it was given no tokenizer (ssb tokenises prompts itself), and the
    traceback it logs at every engine start reads like a failure. Any other warmup failure still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        tokenizerless = isinstance(error, ValueError) and "skip_tokenizer_init" in str(error)
        return not (tokenizerless and record.getMessage().startswith("Chat template warmup failed"))


WARMUP_FILTER = TokenizerlessWarmupFilter()


def request_seed(seed: int, prompt_ids: list[int]) -> int:
    """The vLLM seed of one prompt's request: keyed on the prompt's ids (not its position), like the engine's
    per-sequence streams, so rerunning a subset of prompts reproduces their samples."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(8, "little", signed=True))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in prompt_ids))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    """Bytes of K and V one token occupies across all layers (config: a model's config.json)."""
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(
    config: dict, dtype_bytes: int, batch_size: int, tokens_per_sequence: int, available_bytes: int, max_len: int = 0
) -> int:
    """KV cache budget: batch_size sequences of tokens_per_sequence tokens (the engine's static cache holds
    the same, with the same 1.25 slack), at most half of available_bytes, but at least one sequence of
    max(tokens_per_sequence, max_len) tokens plus 10%: vLLM refuses to start unless one max_model_len
    sequence fits (its usable cache is a little below the bytes given)."""
    per_token = kv_bytes_per_token(config, dtype_bytes)
    want = int(1.25 * batch_size * tokens_per_sequence * per_token)
    floor = int(1.1 * max(tokens_per_sequence, max_len) * per_token)
    return max(floor, min(want, available_bytes // 2))


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else psutil, else 4 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 4 * GIB


def rank_devices(w: parallel.World, tensor_parallel: int) -> None:
    """Under a launcher with several ranks per node, give this rank's vLLM engine its own GPUs: local rank r gets
    devices [r * tp, (r + 1) * tp) of those visible, through CUDA_VISIBLE_DEVICES, which the engine's worker
    processes (started after this) inherit. The ranks of a node must not need more GPUs than it has."""
    if w.size == 1:
        return
    import torch

    # the node's devices as first seen: a later engine in this process must not slice the slice again
    visible = os.environ.get("SSB_NODE_DEVICES") or os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["SSB_NODE_DEVICES"] = ",".join(devices)
    mine = devices[w.local_rank * tensor_parallel : (w.local_rank + 1) * tensor_parallel]
    if len(mine) < tensor_parallel:
        raise ValueError(
            f"rank {w.rank} (local rank {w.local_rank}) needs vllm_tensor_parallel={tensor_parallel} GPUs but the "
            f"node shows {len(devices)}: launch fewer processes per node (nproc-per-node x vllm_tensor_parallel "
            "<= GPUs per node)"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def loadable_model_dir(model_dir: str | Path, scratch: Path) -> Path:
    """model_dir as vLLM can load it: a model converted from GGUF may still carry `quantization_config:
    {quant_method: gguf}` in its config.json although its weights are plain safetensors, and vLLM would then look
    for a GGUF file. Such a directory is mirrored into `scratch` (links to every file, config.json rewritten
    without the key); the original is never modified."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return model_dir
    del config["quantization_config"]
    view = scratch / "model"
    view.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    (view / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return view


class VllmGenerator:
    """Same contract as `ssb.engine.Engine`, generating with vLLM; see the module docstring.

    model_dir: a Hugging Face model directory (adapters already merged). tokenizer: the model's tokenizer (ssb
    tokenises and decodes; vLLM sees token ids only). dtype: "float32", "bfloat16" or "float16".
    batch_size: most sequences vLLM runs at once (max_num_seqs). device: "cpu" or "cuda...".
    kv_cache_gib: 0 = the budget from `kv_cache_bytes`. cleanup: directories removed by `close()`.
    lora_rank: > 0 serves PEFT LoRA adapters up to that rank on top of model_dir, one per `generate` call
    (`adapter=`): GRPO's policy changes every step, and loading its small adapter beats restarting the engine.
    """

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer,
        *,
        dtype: str,
        batch_size: int = 64,
        device: str = "cpu",
        kv_cache_gib: float = 0.0,
        tensor_parallel: int = 1,
        progress: bool = True,
        cleanup: list[Path] | None = None,
        trust_remote_code: bool = False,
        lora_rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        import vllm

        self.scratch = Path(tempfile.mkdtemp(prefix="ssb-vllm-"))
        self.cleanup = [self.scratch, *(cleanup or [])]
        self.model_dir = loadable_model_dir(model_dir, self.scratch)
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.tokenizer, self.dtype, self.device = tokenizer, dtype, device
        self.batch_size, self.kv_cache_gib, self.progress = batch_size, kv_cache_gib, progress
        self.trust_remote_code, self.tensor_parallel = trust_remote_code, tensor_parallel
        self.backend = f"vllm-{vllm.__version__}/{dtype}"
        self.reproducibility = (
            "per-request seeds from (seed, prompt ids); same seed, model, dtype, vLLM version and machine give "
            "the same samples (chunked prefill off on CPU); not the engine's samples"
        )
        self.stop_ids = stop_token_ids(tokenizer, _GenerationConfigView(self.model_dir))
        if not self.stop_ids:
            raise ValueError("tokenizer and model define no eos token: generation could never stop early")
        self.llm = None
        self.kv_cache_bytes = self.max_len = 0
        self.lora_rank = lora_rank
        self._lora_ids: dict[str, int] = {}

    def start(self, tokens_per_sequence: int, sequences: int) -> None:
        """Start vLLM's engine with a KV cache for `sequences` of `tokens_per_sequence` (`generate` does this at its
        first call, sized by that call)."""
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # else one core is kept for the scheduler
        if not self.device.startswith("cuda"):
            # vLLM kills its engine when one model step takes over 300 s (meant to catch a hung GPU); on a CPU
            # shared with other jobs one step of 256 prefills took longer, and an experiment's eval died with
            # EngineDeadError (2026-12-05)
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
        from vllm import LLM

        logging.getLogger("vllm.renderers.base").addFilter(WARMUP_FILTER)  # a second add is a no-op
        dtype_bytes = 4 if self.dtype == "float32" else 2
        # room for later calls with somewhat longer prompts (teach's rounds, eval resumes) without a restart
        max_len = self.config.get("max_position_embeddings") or tokens_per_sequence
        max_len = min(max_len, max(tokens_per_sequence, 2048))
        self.max_len = max_len
        if self.kv_cache_gib > 0:
            self.kv_cache_bytes = int(self.kv_cache_gib * GIB)
        else:
            sequences = min(self.batch_size, sequences)
            available = available_memory_bytes()
            self.kv_cache_bytes = kv_cache_bytes(
                self.config, dtype_bytes, sequences, tokens_per_sequence, available, max_len
            )
        cpu = not self.device.startswith("cuda")
        if not cpu:
            rank_devices(parallel.current(), self.tensor_parallel)
        print(
            f"[vllm] starting {self.backend} on {self.device}: KV cache {self.kv_cache_bytes / GIB:.2f} GiB, "
            f"up to {self.batch_size} sequences, max length {max_len}",
            flush=True,
        )
        self.llm = LLM(
            model=str(self.model_dir),
            dtype=self.dtype,
            skip_tokenizer_init=True,  # ssb tokenises and decodes
            max_model_len=max_len,
            max_num_seqs=self.batch_size,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            enable_prefix_caching=True,  # a prompt's n samples and shared system prompts prefill once
            enable_chunked_prefill=not cpu,  # CPU: per-request seeds fail with split prefills (docstring)
            enforce_eager=cpu,  # CPU: torch.compile warm-up ran > 5 min on 2 cores without finishing
            trust_remote_code=self.trust_remote_code,
            tensor_parallel_size=self.tensor_parallel,
            seed=0,
            **lora_settings(self.lora_rank),
        )

    def generate(
        self,
        prompts,
        n: int,
        params: SamplingParams,
        callback: Callable[[int, list[Completion]], None] | None = None,
        adapter: str | Path | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt, in order; `callback(i, completions)` fires when prompt i's n are done.
        adapter: a PEFT LoRA adapter directory to generate with (needs `lora_rank`); each new path is loaded
        once, under an id of its own, so a rewritten adapter must get a new path."""
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        ids = request_ids(self.tokenizer, prompts, n, params, self.config.get("vocab_size") or len(self.tokenizer))
        results: list[list[Completion]] = [[] for _ in ids]
        if not ids:
            return results
        n_run = 1 if params.temperature == 0 else n  # greedy samples are identical, as in the engine
        lora = self._lora_request(adapter)
        need = max(map(len, ids)) + params.max_new_tokens
        longest = self.config.get("max_position_embeddings") or need
        if self.llm is not None and self.max_len < min(need, longest):  # e.g. teach's hinted prompts after rollouts
            print(f"[vllm] restarting: this call needs {need} tokens per sequence, above {self.max_len}", flush=True)
            self._stop()
        if self.llm is None:  # sized by the first call (teach's later rounds have fewer prompts)
            self.start(need, len(ids) * n_run)
        engine = self.llm.llm_engine
        for i, p in enumerate(ids):
            sp = VllmParams(
                n=n_run,
                temperature=params.temperature,
                top_k=params.top_k if params.top_k > 0 else -1,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=sorted(self.stop_ids),
                ignore_eos=False,
                seed=request_seed(params.seed, p) if params.temperature > 0 else None,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            engine.add_request(f"ssb-{i}", {"prompt_token_ids": p}, sp, lora_request=lora)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="generate (vllm)", unit="prompt")
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if not out.finished:
                        continue
                    i = int(out.request_id.removeprefix("ssb-"))
                    comps = [self._completion(list(o.token_ids)) for o in sorted(out.outputs, key=lambda o: o.index)]
                    if n_run < n:
                        comps = [replace(comps[0], token_ids=list(comps[0].token_ids)) for _ in range(n)]
                    results[i] = comps
                    if bar is not None:
                        bar.update(1)
                    if callback is not None:
                        callback(i, comps)
        except BaseException:
            engine.abort_request([f"ssb-{i}" for i, r in enumerate(results) if not r])
            raise
        finally:
            if bar is not None:
                bar.close()
        return results

    def _lora_request(self, adapter: str | Path | None):
        if adapter is None:
            return None
        if self.lora_rank <= 0:
            raise ValueError("VllmGenerator: generating with an adapter needs lora_rank > 0 at construction")
        rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 0)
        if rank > self.lora_rank:
            raise ValueError(f"adapter {adapter} has LoRA rank {rank}, above this engine's lora_rank {self.lora_rank}")
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)  # vLLM ids start at 1
        return LoRARequest(f"ssb-adapter-{lora_id}", lora_id, key)

    def _completion(self, token_ids: list[int]) -> Completion:
        """A Completion as the engine builds it (ssb.engine.scheduler: text without the stop token)."""
        stop = bool(token_ids) and token_ids[-1] in self.stop_ids
        text = self.tokenizer.decode(token_ids[:-1] if stop else token_ids, skip_special_tokens=True)
        return Completion(
            text=text, token_ids=token_ids, num_tokens=len(token_ids), finish_reason="stop" if stop else "length"
        )

    def _stop(self) -> None:
        """Stop vLLM's engine processes (the next call starts them again)."""
        if self.llm is not None:
            shutdown = getattr(self.llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the scratch directories."""
        self._stop()
        for d in self.cleanup:
            shutil.rmtree(d, ignore_errors=True)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass


# the ranks vLLM accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_settings(rank: int) -> dict:
    """LLM(...) keyword arguments for serving one LoRA adapter at a time of rank <= `rank` (none for 0)."""
    if rank <= 0:
        return {}
    allowed = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not allowed:
        raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")
    return {"enable_lora": True, "max_lora_rank": allowed[0], "max_loras": 1, "max_cpu_loras": 2}


class _GenerationConfigView:
    """What `stop_token_ids` reads from a model (`generation_config.eos_token_id`), read from the directory."""

    def __init__(self, model_dir: Path):
        # transformers falls back to config.json's eos ids when there is no generation_config.json
        path = Path(model_dir) / "generation_config.json"
        if not path.exists():
            path = Path(model_dir) / "config.json"
        eos = json.loads(path.read_text()).get("eos_token_id")

        class _Cfg:
            eos_token_id = eos

        self.generation_config = _Cfg()
