"""The ``single_turn_stats`` generate function: the built-in single-turn rollout, plus per-sample stats.

Registered under the ``miles.generate`` entry-point group (``--custom-generate-function-path
single_turn_stats``). It drives the run's engine through ``miles_core.rollout.generate`` (the rollout
context and ``generate_into``), fills every field a generate function owns, and adds
``sample.metadata["example"]`` (finish reason, mean log-prob, weight version) for analysis.
"""

from __future__ import annotations

import argparse

from miles_core import Sample, Status
from miles_core.api import current_context, generate_into


async def single_turn_stats(args: argparse.Namespace, sample: Sample, sampling_params: dict) -> Sample:
    """Generate one response to ``sample``'s prompt and record how it went in its metadata."""
    ctx = current_context()  # the engine, tokenizer and plugin manager of the rollout in progress
    prompt_ids = list(sample.tokens) if sample.tokens else ctx.tokenizer.encode(str(sample.prompt))
    out_ids, log_probs, finish, routes = await generate_into(args, sample, prompt_ids, sampling_params)
    sample.tokens = prompt_ids + out_ids
    sample.response_length = len(out_ids)
    sample.response = ctx.tokenizer.decode(out_ids, skip_special_tokens=True)
    sample.rollout_log_probs = log_probs  # what the engine sampled from: the trainer checks against it
    sample.loss_mask = [1] * len(out_ids)
    sample.status = Status.COMPLETED if finish == "stop" else Status.TRUNCATED
    if routes is not None:  # MoE routes captured for routing replay (miles-r3): hand them on
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    sample.metadata["example"] = {
        "finish_reason": finish,
        "mean_log_prob": sum(log_probs) / len(log_probs) if log_probs else 0.0,
        "weight_version": sample.weight_versions[-1] if sample.weight_versions else None,
    }
    return sample
