"""Built-in generate functions (entry-point group ``miles.generate``) and the rollout context.

A generate function has slime's signature, ``async def generate(args, sample, sampling_params)``, and
reaches the engine through `current_context()`, which the rollout manager sets for the duration of a
rollout. `generate_into` does the common part: run the engine and fill the sample's fields.

Each engine request gets its own request id (``rid``). A generate call that outlives ``--rollout-timeout``
is aborted through ``engine.abort(rid)`` and returns finish reason ``abort`` (its sample becomes ABORTED).
A request aborted by anything else (a weight update with ``--update-weights-pause-mode abort``) is sent
again under the new weights: from scratch, or with ``--partial-rollout`` as a continuation, prompt plus the
partial response as input and the rest of the token budget, so tokens, log-probs and per-token weight
versions line up across the pieces (slime's partial rollout). A partial response whose oldest token is
older than the staleness bound allows (``min_weight_version``) is dropped and regenerated instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from miles_core.engine.sampler import SamplingParams
from miles_core.engine.sequence import EngineOutput
from miles_core.types import Sample, Status

ABORT_GRACE_S = 30.0  # how long an aborted request may take to answer before it is abandoned


@dataclass
class RolloutContext:
    """What a generate function may use during one rollout, and how its engine requests run."""

    engine: Any  # a RolloutBackend (miles_core.protocols): the built-in Engine, an HTTP client, ...
    tokenizer: Any  # miles_core.data.Tokenizer
    pm: Any  # pluggy PluginManager, to call on_route_record
    timeout: float | None = None  # --rollout-timeout: seconds a generate call may take
    partial_rollout: bool = False  # --partial-rollout: continue an aborted request, not restart it
    # The oldest weight version a kept token may come from (the staleness bound); None: no bound.
    min_weight_version: int | None = None
    stopping: threading.Event = field(default_factory=threading.Event)  # set: abort, never resend
    rid_prefix: str = "miles"
    # Counts of this rollout: continuations, restarts, stale_restarts, timeouts.
    stats: Counter = field(default_factory=Counter)
    timed_out: set[int] = field(default_factory=set)  # id() of the samples whose call timed out
    _rids: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def new_rid(self) -> str:
        """A request id no other request of this run uses."""
        return f"{self.rid_prefix}-{next(self._rids)}"


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


def finish_status(finish: str) -> Status:
    """The sample status of an engine finish reason: stop, length, abort (timed out)."""
    return {"stop": Status.COMPLETED, "abort": Status.ABORTED}.get(finish, Status.TRUNCATED)


def feed_unsampled(sample: Sample, inserted: list[int], ids: list, logps: list, mask: list) -> None:
    """Append tokens the policy did not sample (a user or tool turn) to a multi-turn response: fed to the
    model, out of the loss (mask 0, log-prob 0, weight version -1)."""
    ids += inserted
    logps += [0.0] * len(inserted)
    mask += [0] * len(inserted)
    sample.response_weight_versions += [-1] * len(inserted)


def set_response(sample: Sample, tok: Any, prompt_len: int, ids: list, logps: list, mask: list) -> None:
    """Store a multi-turn response (every token after the prompt) and its per-token lists on ``sample``."""
    sample.tokens = ids
    sample.response_length = len(mask)
    sample.response = tok.decode(ids[prompt_len:], skip_special_tokens=True)
    sample.rollout_log_probs = logps
    sample.loss_mask = mask


async def _request(
    ctx: RolloutContext, input_ids: list[int], params: dict, deadline: float | None
) -> tuple[EngineOutput, bool]:
    """One engine request under a fresh rid, aborted at ``deadline`` (loop time); (output, timed out)."""
    rid = ctx.new_rid()
    task = asyncio.ensure_future(ctx.engine.generate(input_ids, params, rid=rid))
    if deadline is None:
        return await task, False
    loop = asyncio.get_running_loop()
    done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
    if not done:
        # The control call may block (an HTTP backend's request, or the engine's queue from another
        # thread), so it runs off this loop.
        await asyncio.to_thread(ctx.engine.abort, rid)
        done, _ = await asyncio.wait({task}, timeout=ABORT_GRACE_S)
        if not done:  # the backend never answered the abort: give the request up
            task.cancel()
            return EngineOutput([], [], "abort", len(input_ids), ctx.engine.weight_version, rid=rid), True
        out = task.result()
        return out, out.finish_reason == "abort"
    return task.result(), False


async def run_request(ctx: RolloutContext, prompt_ids: list[int], sampling_params: dict) -> EngineOutput:
    """Generate a continuation of ``prompt_ids`` to its end, through aborts by weight updates (see the
    module docstring); the output covers the whole response. Finish reason ``abort`` means the call
    outlived ``--rollout-timeout`` (or the run is stopping)."""
    loop = asyncio.get_running_loop()
    deadline = None if ctx.timeout is None else loop.time() + ctx.timeout
    budget = int(sampling_params.get("max_new_tokens", SamplingParams.max_new_tokens))
    ids: list[int] = []
    logps: list[float] = []
    versions: list[int] = []
    while True:
        params = dict(sampling_params, max_new_tokens=budget - len(ids))
        out, timed_out = await _request(ctx, prompt_ids + ids, params, deadline)
        ids += out.output_ids
        logps += out.log_probs
        versions += out.output_weight_versions or [out.weight_version] * len(out.output_ids)
        finish = out.finish_reason
        if finish != "abort" or timed_out or ctx.stopping.is_set():
            break
        if len(ids) >= budget:  # aborted after its last token: it is complete
            finish = "length"
            break
        bound = ctx.min_weight_version
        if ctx.partial_rollout and (not versions or bound is None or min(versions) >= bound):
            ctx.stats["continuations"] += 1
            continue
        # Without --partial-rollout the request starts over; with it, its oldest token is too old.
        ctx.stats["stale_restarts" if ctx.partial_rollout else "restarts"] += 1
        ids, logps, versions = [], [], []
    if finish == "abort":
        ctx.stats["timeouts"] += 1
    return dataclasses.replace(
        out,
        output_ids=ids,
        log_probs=logps,
        finish_reason=finish,
        prompt_len=len(prompt_ids),
        output_weight_versions=versions,
    )


async def generate_into(
    args: argparse.Namespace, sample: Sample, prompt_ids: list[int], sampling_params: dict
) -> tuple[list[int], list[float], str, Any]:
    """Run the engine on ``prompt_ids``; returns (output ids, log-probs, finish reason, routes).

    Appends to ``sample.weight_versions`` the version at the end of the call and to
    ``sample.response_weight_versions`` the version of each output token; finish reason ``abort``: the
    call outlived ``--rollout-timeout`` and the rollout manager marks the sample ABORTED."""
    ctx = current_context()
    out = await run_request(ctx, prompt_ids, sampling_params)
    if out.finish_reason == "abort":
        ctx.timed_out.add(id(sample))
    sample.weight_versions.append(out.weight_version)
    sample.response_weight_versions.extend(out.output_weight_versions)
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
    sample.status = finish_status(finish)
    if routes is not None:
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    return sample


async def multi_turn(args: argparse.Namespace, sample: Sample, sampling_params: dict) -> Sample:
    """Answer every user turn of a chat prompt in order; only the model's tokens are trained.

    ``sample.prompt`` is a list of messages; the model answers the first user turn, then each later
    user message (from ``sample.metadata["turns"]``, a list of strings) is appended with the chat
    template and the model answers again. Inserted user-turn tokens get loss mask 0 and weight version -1
    (no policy sampled them).
    """
    ctx = current_context()
    tok = ctx.tokenizer
    messages = (
        list(sample.prompt)
        if isinstance(sample.prompt, list)
        else [{"role": "user", "content": str(sample.prompt)}]
    )
    turns = list(sample.metadata.get("turns", []))
    kwargs = args.apply_chat_template_kwargs
    prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
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
        full = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
        inserted = full[len(ids) :] if full[: len(ids)] == ids else full[-1:]
        feed_unsampled(sample, inserted, ids, logps, mask)
    set_response(sample, tok, len(prompt_ids), ids, logps, mask)
    sample.status = finish_status(finish)
    if routes is not None:  # the last turn's routes cover every token fed so far
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    return sample
