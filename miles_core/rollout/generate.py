"""Built-in generate functions (entry-point group ``miles.generate``) and the rollout context.

A generate function has slime's signature, ``async def generate(args, sample, sampling_params)``, and
reaches the engine through `current_context()`, which the rollout manager sets for the duration of a
rollout. `generate_into` does the common part: run the engine and fill the sample's fields.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from miles_core.types import Sample, Status


@dataclass
class RolloutContext:
    """What a generate function may use during one rollout."""

    engine: Any  # miles_core.engine.Engine (or another backend with the same generate())
    tokenizer: Any  # miles_core.data.Tokenizer
    pm: Any  # pluggy PluginManager, to call on_route_record


_CONTEXT: contextvars.ContextVar[RolloutContext] = contextvars.ContextVar("miles_rollout_context")


def current_context() -> RolloutContext:
    """The engine, tokenizer and plugin manager of the rollout in progress."""
    try:
        return _CONTEXT.get()
    except LookupError:
        raise RuntimeError("no rollout in progress: generate functions run inside RolloutManager") from None


@contextlib.contextmanager
def rollout_context(ctx: RolloutContext) -> Iterator[RolloutContext]:
    token = _CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.reset(token)


async def generate_into(
    args: argparse.Namespace, sample: Sample, prompt_ids: list[int], sampling_params: dict
) -> tuple[list[int], list[float], str, Any]:
    """Run the engine on ``prompt_ids``; returns (output ids, log-probs, finish reason, routes)."""
    ctx = current_context()
    out = await ctx.engine.generate(prompt_ids, sampling_params)
    sample.weight_versions.append(out.weight_version)
    if out.spec_info:  # decode-strategy stats (multi-turn: the last turn's)
        sample.spec_info = dict(out.spec_info)
    if out.sampling_params:  # what the engine sampled with (multi-turn: the last turn's)
        sample.sampling_params = dict(out.sampling_params)
    return out.output_ids, out.log_probs, out.finish_reason, out.routed_experts


async def single_turn(args: argparse.Namespace, sample: Sample, sampling_params: dict) -> Sample:
    """One prompt, one response: the default generate function."""
    ctx = current_context()
    prompt_ids = list(sample.tokens) if sample.tokens else ctx.tokenizer.encode(str(sample.prompt))
    out_ids, logps, finish, routes = await generate_into(args, sample, prompt_ids, sampling_params)
    sample.tokens = prompt_ids + out_ids
    sample.response_length = len(out_ids)
    sample.response = ctx.tokenizer.decode(out_ids, skip_special_tokens=True)
    sample.rollout_log_probs = logps
    sample.loss_mask = [1] * len(out_ids)
    sample.status = Status.COMPLETED if finish == "stop" else Status.TRUNCATED
    if routes is not None:
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    return sample


async def multi_turn(args: argparse.Namespace, sample: Sample, sampling_params: dict) -> Sample:
    """Answer every user turn of a chat prompt in order; only the model's tokens are trained.

    ``sample.prompt`` is a list of messages; the model answers the first user turn, then each later
    user message (from ``sample.metadata["turns"]``, a list of strings) is appended with the chat
    template and the model answers again. Inserted user-turn tokens get loss mask 0.
    """
    ctx = current_context()
    tok = ctx.tokenizer
    messages = (
        list(sample.prompt)
        if isinstance(sample.prompt, list)
        else [{"role": "user", "content": str(sample.prompt)}]
    )
    turns = list(sample.metadata.get("turns", []))
    prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    ids, logps, mask = list(prompt_ids), [], []
    max_total = int(sampling_params.get("max_new_tokens", 128))
    finish, routes = "stop", None
    while True:
        params = dict(sampling_params, max_new_tokens=max(1, max_total - len(mask)))
        out_ids, lps, finish, routes = await generate_into(args, sample, ids, params)
        ids += out_ids
        logps += lps
        mask += [1] * len(out_ids)
        messages.append({"role": "assistant", "content": tok.decode(out_ids, skip_special_tokens=True)})
        if finish != "stop" or not turns or len(mask) >= max_total:
            break
        messages.append({"role": "user", "content": turns.pop(0)})
        full = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        inserted = full[len(ids) :] if full[: len(ids)] == ids else full[-1:]
        ids += inserted
        logps += [0.0] * len(inserted)
        mask += [0] * len(inserted)
    sample.tokens = ids
    sample.response_length = len(mask)
    sample.response = tok.decode(ids[len(prompt_ids) :], skip_special_tokens=True)
    sample.rollout_log_probs = logps
    sample.loss_mask = mask
    sample.status = Status.COMPLETED if finish == "stop" else Status.TRUNCATED
    if routes is not None:  # the last turn's routes cover every token fed so far
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    return sample
