"""The built-in rollout engine (rollout backend ``torch``): KV cache, batched sampling, route capture."""

from miles_core.engine.engine import Engine, EngineOutput
from miles_core.engine.sampler import SamplingParams, sample_tokens, tempered_logits

__all__ = ["Engine", "EngineOutput", "SamplingParams", "sample_tokens", "tempered_logits"]
