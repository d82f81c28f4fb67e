"""The ``tool_call`` generate function (``--custom-generate-function-path tool_call``): multi-turn tool use.

The model answers the prompt; when a finished turn holds tool calls (``<tool_call>{"name": ...,
"arguments": {...}}</tool_call>``, see `miles_core.rollout.tools`), the tools of ``--tools`` run, their
outputs are appended as one tool turn, and the model goes on, for at most ``--max-turns`` assistant turns.
The tool turn is written the way Qwen2.5/Qwen3's ChatML template renders ``tool`` messages::

    <|im_end|>            (only if the model's turn did not end with it already)
    \\n<|im_start|>user\\n<tool_response>\\n{output}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

(one ``<tool_response>`` block per call). Tool-turn tokens are loss-masked (mask 0, log-prob 0, weight
version -1): only the model's own tokens train. The whole response, tool turns included, stays within
``--rollout-max-response-len`` tokens; a tool turn that would overflow it ends the sample as TRUNCATED.
``metadata["tool_calls"]`` counts the calls and ``metadata["turns"]`` the assistant turns.

Every turn after the first is sampled with its own ``sampling_seed`` (`turn_seed`): the engine hands out
sampling keys in the order requests arrive, and a later turn arrives when its tools have finished, which
depends on timing; with the seed, a seeded run repeats its samples.
"""

from __future__ import annotations

import argparse
import hashlib

from miles_core.rollout.generate import (
    current_context,
    feed_unsampled,
    finish_status,
    generate_into,
    set_response,
)
from miles_core.rollout.tools import parse_tool_calls, registry_for
from miles_core.types import Sample, Status

TURN_END = "<|im_end|>"


def tool_turn(outputs: list[str], closed: bool) -> str:
    """The text appended after a model turn whose calls gave ``outputs``; ``closed``: the turn already ended
    with ``<|im_end|>``."""
    blocks = "".join(f"\n<tool_response>\n{o}\n</tool_response>" for o in outputs)
    return ("" if closed else TURN_END) + f"\n<|im_start|>user{blocks}{TURN_END}\n<|im_start|>assistant\n"


def turn_seed(args: argparse.Namespace, sample: Sample, ids: list[int], turn: int, seed: int | None) -> int:
    """The sampling seed of assistant turn ``turn`` (2, 3, ...) of ``sample`` after the tokens ``ids``: a hash
    of ``--rollout-seed``, the caller's ``sampling_seed`` (if any), the weight version of the first turn (a
    new one each rollout), the sample's place in the rollout and the tokens so far; it does not depend on
    when the tools returned, and two samples of a group get different ones."""
    version = sample.weight_versions[0] if sample.weight_versions else None
    where = f"{args.rollout_seed},{seed},{version},{sample.group_index},{sample.index},{turn}"
    key = where + ":" + ",".join(map(str, ids))
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF


async def tool_call(args: argparse.Namespace, sample: Sample, sampling_params: dict) -> Sample:
    """Generate with tool use: model turn, tool turn, model turn, ... (see the module docstring)."""
    ctx = current_context()
    tok = ctx.tokenizer
    tools = registry_for(args.tools)
    prompt_ids = list(sample.tokens) if sample.tokens else tok.encode(str(sample.prompt))
    ids, logps, mask = list(prompt_ids), [], []
    budget = int(sampling_params.get("max_new_tokens", 128))
    finish, routes, turns, calls_made, truncated = "stop", None, 0, 0, False
    while True:
        params = dict(sampling_params, max_new_tokens=budget - len(mask))
        if turns:  # the first turn keeps the engine's key (its requests arrive in a fixed order)
            seed = sampling_params.get("sampling_seed")
            params["sampling_seed"] = turn_seed(args, sample, ids, turns + 1, seed)
        out_ids, lps, finish, routes = await generate_into(args, sample, ids, params)
        ids += out_ids
        logps += lps
        mask += [1] * len(out_ids)
        turns += 1
        if finish != "stop" or turns >= args.max_turns or len(mask) >= budget:
            break
        text = tok.decode(out_ids, skip_special_tokens=False)
        calls = parse_tool_calls(text)
        if not calls:
            break
        outputs = [await tools.call(args, c) for c in calls]
        calls_made += len(calls)
        inserted = tok.encode(tool_turn(outputs, text.rstrip().endswith(TURN_END)))
        if len(mask) + len(inserted) >= budget:  # no room for the tool turn and one more token
            truncated = True
            break
        feed_unsampled(sample, inserted, ids, logps, mask)
    set_response(sample, tok, len(prompt_ids), ids, logps, mask)
    sample.status = Status.TRUNCATED if truncated else finish_status(finish)
    sample.metadata["tool_calls"] = calls_made
    sample.metadata["turns"] = turns
    if routes is not None:  # the last turn's routes cover every token fed so far
        ctx.pm.hook.on_route_record(args=args, sample=sample, routed_experts=routes)
    return sample
