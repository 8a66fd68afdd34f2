"""Batched generation for every stage that samples from a model (rollouts, teacher solutions, eval, GRPO).

`engine` holds `Engine` (prompts in, completions out), `scheduler` the continuous-batching loop behind it,
`cache` the model wrapper with preallocated KV caches it decodes through, and `sampling` the sampling
parameters and the seeded per-sequence token sampler.
"""

from ssb.engine.engine import Engine, stop_token_ids, tokenize_prompts
from ssb.engine.sampling import SamplingParams
from ssb.engine.scheduler import Completion

__all__ = ["Completion", "Engine", "SamplingParams", "stop_token_ids", "tokenize_prompts"]
