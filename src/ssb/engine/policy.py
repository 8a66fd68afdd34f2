"""GRPO's completions from the policy being trained, through ssb's generation backend (engine or vLLM).

`PolicyRollout` is the `rollout_func` ssb hands TRL's GRPOTrainer (ssb.stages.grpo): TRL calls it once per
generation round with the round's prompts and the trainer, and it returns prompt and completion token ids.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ssb import parallel
from ssb.config import Config


class PolicyRollout:
    """TRL's `rollout_func`: GRPO's completions sampled from the current policy by ssb's generation backend
    (`generation_backend`, as rollout, teach and eval) instead of TRL's padded `model.generate`.

    - engine: ssb's engine over the live LoRA-wrapped model, each step (paged KV cache, continuous batching, one
      prompt prefill shared by its group).
    - vllm: one vLLM engine on the base model for the whole run, started at the first step. Each step saves the
      policy's current LoRA adapter (a few MB) and vLLM serves the step's requests with it, so the new weights
      reach vLLM without restarting the engine or copying the model into it.

    TRL passes the step's prompts with each repeated `num_generations` times in a row; each group's samples come
    from one prompt. Same temperature / top-k / top-p / length as TRL would use; the seed moves with the
    optimizer step, so a question seen again in a later epoch gets fresh samples. `close()` stops vLLM."""

    def __init__(self, cfg: Config, batch_size: int = 128, manifest: tuple | None = None):
        self.cfg, self.batch_size, self.manifest = cfg, batch_size, manifest
        self.backend: str | None = None  # decided at the first call
        self.vllm = None
        self.scratch: Path | None = None
        self.calls = 0
        self.why: str | None = None  # the engine's reason, until the manifest records it

    def __call__(self, prompts: list, trainer) -> dict:
        from ssb.engine.engine import SamplingParams, tokenize_prompts

        gc = self.cfg.grpo
        g = trainer.num_generations
        grouped = len(prompts) % g == 0 and all(
            prompts[i : i + g] == [prompts[i]] * g for i in range(0, len(prompts), g)
        )
        unique, n = (prompts[::g], g) if grouped else (prompts, 1)
        params = SamplingParams(
            temperature=gc.temperature,
            top_k=gc.top_k,
            top_p=gc.top_p,
            max_new_tokens=gc.max_completion_length,
            seed=self.cfg.seed * 1_000_003 + trainer.state.global_step,
        )
        prompt_ids = tokenize_prompts(trainer.processing_class, unique)  # once: id lists pass through the engine
        completions = self._generate(trainer, prompt_ids, n, params)
        return {
            "prompt_ids": [ids for ids in prompt_ids for _ in range(n)],
            "completion_ids": [c.token_ids for group in completions for c in group],
            "logprobs": None,
        }  # only used by TRL's vLLM importance-sampling correction

    def _generate(self, trainer, prompt_ids: list, n: int, params) -> list:
        from ssb.engine.backends import ENGINE_REPRODUCIBILITY, backend_for, make_generator
        from ssb.engine.engine import Engine

        model = trainer.accelerator.unwrap_model(trainer.model)
        self.calls += 1
        if self.backend is None:
            self.backend, why = backend_for(self.cfg)
            if self.backend == "vllm":
                if not hasattr(model, "peft_config"):
                    raise ValueError("GRPO through vLLM needs the LoRA policy (a PEFT model) to pass its weights")
                self.vllm = make_generator(
                    self.cfg,
                    batch_size=self.batch_size,
                    progress=False,
                    manifest=self.manifest,
                    lora_rank=self.cfg.train.lora_r,
                )
                self.scratch = Path(tempfile.mkdtemp(prefix="ssb-grpo-policy-"))
            else:
                print(f"[generation] engine: {why}", flush=True)
                self.why = why
        if self.vllm is not None:
            adapter = self.scratch / f"policy-{self.calls}"  # a new path per step: vLLM loads each path once
            model.save_pretrained(str(adapter))
            try:
                return self.vllm.generate(prompt_ids, n, params, adapter=adapter)
            finally:
                shutil.rmtree(adapter, ignore_errors=True)
        engine = Engine(
            model,
            trainer.processing_class,
            batch_size=self.batch_size,
            progress=False,
            kv_budget_mib=self.cfg.generation_memory_mib,
        )
        if self.why is not None and self.manifest is not None and parallel.current().is_main:
            run, name = self.manifest  # recorded once, as make_generator records the other stages' backend
            gen = {"backend": engine.backend, "why": self.why, "reproducibility": ENGINE_REPRODUCIBILITY}
            run.update_stage(name, generation=gen)
            self.why = None
        return engine.generate(prompt_ids, n, params)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None
