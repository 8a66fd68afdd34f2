"""Batched generation for every stage that samples from a model (rollouts, teacher solutions, eval, GRPO).

`engine` holds `Engine` (continuous batching) and its request/result types, `cache` the model wrapper with
preallocated KV caches it decodes through, `sampling` the seeded per-sequence token sampler.
"""

from ssb.engine.engine import Completion, Engine, SamplingParams, stop_token_ids, tokenize_prompts

__all__ = ["Completion", "Engine", "SamplingParams", "stop_token_ids", "tokenize_prompts"]
