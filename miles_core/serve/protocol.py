"""The subset of SGLang's native HTTP API that miles and slime use: request parsing, response encoding and
the client's decoding of it. Shared by `miles serve` (server), the router and the HTTP rollout client.

``POST /generate`` takes ``input_ids`` (or ``text``), ``sampling_params`` (``temperature``, ``top_p``,
``top_k``, ``max_new_tokens``, ``stop``, ``stop_token_ids``, ``sampling_seed``), ``return_logprob``,
``logprob_start_len``, ``return_routed_experts`` and ``rid``; it answers ``text``, ``output_ids`` and
``meta_info`` with ``id``, ``finish_reason`` (``{"type": "stop" | "length" | "abort", ...}``),
``prompt_tokens``, ``completion_tokens``, ``output_token_logprobs`` (``[[logprob, token_id, null], ...]``),
``routed_experts`` (base64 of little-endian int32, ``[prompt_tokens + completion_tokens - 1, layers,
topk]`` flattened) and ``weight_version`` (a string). ``max_new_tokens`` 0 with ``return_logprob`` and
``logprob_start_len`` L >= 0 scores the prompt instead (slime's on-policy-distillation teacher request):
``input_token_logprobs`` lists ``[logprob, token_id, null]`` from position L on (the first token's
logprob is null). miles adds ``output_token_weight_versions`` (the
weight version of each output token), ``spec_info`` (decode-strategy statistics) and
``sampling_params_used``; SGLang clients ignore them.

Weights travel over HTTP as safetensors bytes, base64-encoded (never pickle): ``update_weights_from_tensor``
takes ``serialized_named_tensors``, a list of such blobs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from miles_core.engine.sequence import EngineOutput

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids", "sampling_seed")


class BadRequest(ValueError):
    """A malformed request; its message is one sentence naming the problem and the fix (HTTP 400)."""


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    return_routed_experts: bool = False
    rid: str | None = None
    logprob_start_len: int | None = None  # with max_new_tokens 0: score the prompt from this position
    extra: dict[str, Any] = field(default_factory=dict)


def _number(params: dict, key: str, kind: type, low: float | None = None, high: float | None = None) -> None:
    if key not in params or params[key] is None:
        return
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(f"sampling_params.{key} must be {what}, got {v!r}.")
    if (low is not None and v < low) or (high is not None and v > high):
        raise BadRequest(f"sampling_params.{key}={v} is outside [{low}, {high}]; send a value in range.")
    params[key] = kind(v)


def parse_generate(body: Any, tokenizer: Any = None, vocab_size: int | None = None) -> GenerateRequest:
    """Check a ``/generate`` body (token ids below ``vocab_size``, the model's); raises `BadRequest` with one
    sentence for anything malformed."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with input_ids (or text) and sampling_params.")
    ids = body.get("input_ids")
    text = body.get("text")
    if ids is None and text is None:
        raise BadRequest("send input_ids (a list of token ids) or text.")
    if ids is None:
        if not isinstance(text, str):
            raise BadRequest("text must be a string (no batched requests: send one request per prompt).")
        if tokenizer is None:
            raise BadRequest("this server has no tokenizer; send input_ids instead of text.")
        ids = tokenizer.encode(text)
    ints = isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    if not ints or not ids:
        raise BadRequest("input_ids must be a non-empty list of integers (one prompt per request).")
    vocab = vocab_size
    if any(t < 0 or (vocab is not None and t >= vocab) for t in ids):
        raise BadRequest(f"input_ids holds a token id outside the vocabulary [0, {vocab}); fix the ids.")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be a JSON object.")
    params = dict(params)
    _number(params, "temperature", float, 0.0)
    _number(params, "top_p", float, 1e-9, 1.0)
    _number(params, "top_k", int, -1)
    start = body.get("logprob_start_len")
    scoring = params.get("max_new_tokens") == 0 and body.get("return_logprob") and start is not None
    if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
        raise BadRequest(f"logprob_start_len must be an integer >= 0, got {start!r}.")
    if not scoring:
        _number(params, "max_new_tokens", int, 1)
    _number(params, "sampling_seed", int)
    stop = params.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop))
    ):
        raise BadRequest("sampling_params.stop must be a string or a list of strings.")
    sti = params.get("stop_token_ids")
    if sti is not None and not (isinstance(sti, list) and all(isinstance(x, int) for x in sti)):
        raise BadRequest("sampling_params.stop_token_ids must be a list of integers.")
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("rid must be a string.")
    return GenerateRequest(
        input_ids=list(ids),
        sampling_params={k: params[k] for k in SAMPLING_KEYS if params.get(k) is not None},
        return_logprob=bool(body.get("return_logprob", False)),
        return_routed_experts=bool(body.get("return_routed_experts", False)),
        rid=rid,
        logprob_start_len=start if scoring else None,
    )


def encode_routes(routes: np.ndarray) -> str:
    """int32 routes -> base64 text of little-endian int32s (SGLang's ``routed_experts`` encoding)."""
    return base64.b64encode(np.ascontiguousarray(routes, dtype="<i4").tobytes()).decode("ascii")


def decode_routes(payload: str) -> np.ndarray:
    """The inverse of `encode_routes`: a flat int32 array."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"routed_experts is not valid base64 ({err}).") from err
    return np.frombuffer(raw, dtype="<i4").astype(np.int32)


def finish_reason_json(out: EngineOutput) -> dict[str, Any]:
    if out.finish_reason == "length":
        return {"type": "length", "length": len(out.output_ids)}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": "stop", "matched": out.output_ids[-1] if out.output_ids else None}


def generate_response(req: GenerateRequest, out: EngineOutput, tokenizer: Any = None) -> dict[str, Any]:
    """The ``/generate`` answer for a finished request."""
    meta: dict[str, Any] = {
        "id": req.rid,
        "finish_reason": finish_reason_json(out),
        "prompt_tokens": out.prompt_len,
        "completion_tokens": len(out.output_ids),
        "cached_tokens": 0,
        "weight_version": str(out.weight_version),
        "output_token_weight_versions": list(out.output_weight_versions),
        "sampling_params_used": dict(out.sampling_params),
    }
    if req.return_logprob:
        pairs = zip(out.log_probs, out.output_ids)
        meta["output_token_logprobs"] = [[float(lp), int(t), None] for lp, t in pairs]
    if req.return_routed_experts and out.routed_experts is not None:
        meta["routed_experts"] = encode_routes(out.routed_experts)
    if out.spec_info:
        meta["spec_info"] = {k: float(v) for k, v in out.spec_info.items()}
    text = tokenizer.decode(out.output_ids, skip_special_tokens=True) if tokenizer is not None else ""
    return {"text": text, "output_ids": list(out.output_ids), "meta_info": meta}


def score_response(req: GenerateRequest, log_probs: list[float], weight_version: int) -> dict[str, Any]:
    """The ``/generate`` answer to a prompt-scoring request (``max_new_tokens`` 0): SGLang's
    ``input_token_logprobs`` from ``logprob_start_len`` on; ``log_probs[i]`` is token ``i + 1``'s."""
    ids = req.input_ids
    pairs = [[None, ids[0], None]] + [[float(lp), int(t), None] for lp, t in zip(log_probs, ids[1:])]
    meta = {
        "id": req.rid,
        "finish_reason": {"type": "length", "length": 0},
        "prompt_tokens": len(ids),
        "completion_tokens": 0,
        "cached_tokens": 0,
        "weight_version": str(weight_version),
        "input_token_logprobs": pairs[req.logprob_start_len :],
    }
    return {"text": "", "output_ids": [], "meta_info": meta}


def parse_generate_response(body: dict[str, Any]) -> EngineOutput:
    """The client's side: a ``/generate`` answer (from ``miles serve`` or SGLang) -> `EngineOutput`.

    ``routed_experts`` stays the base64 text (its layer and top-k sizes are the model's; R3 reshapes it).
    Log-probs are read from ``output_token_logprobs`` (zeros if the server sent none).
    """
    meta = body.get("meta_info") or {}
    ids = body.get("output_ids")
    lps_raw = meta.get("output_token_logprobs")
    if ids is None and lps_raw is not None:
        ids = [int(x[1]) for x in lps_raw]
    ids = [int(t) for t in ids or []]
    lps = [float(x[0]) for x in lps_raw] if lps_raw is not None else [0.0] * len(ids)
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type", "stop") if isinstance(finish, dict) else str(finish)
    raw_version = meta.get("weight_version", 0)
    try:
        version = int(raw_version)
    except (TypeError, ValueError):
        version = 0  # SGLang's default version string ("default")
    versions = meta.get("output_token_weight_versions") or [version] * len(ids)
    return EngineOutput(
        output_ids=ids,
        log_probs=lps,
        finish_reason=kind if kind in ("stop", "length", "abort") else "stop",
        prompt_len=int(meta.get("prompt_tokens", 0)),
        weight_version=version,
        routed_experts=meta.get("routed_experts"),
        spec_info=dict(meta.get("spec_info") or {}),
        sampling_params=dict(meta.get("sampling_params_used") or {}),
        rid=meta.get("id"),
        output_weight_versions=[int(v) for v in versions],
    )


def encode_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """(name, tensor) pairs -> base64 safetensors bytes (one blob of ``serialized_named_tensors``)."""
    from safetensors.torch import save

    return base64.b64encode(save({n: t.detach().contiguous().cpu() for n, t in named})).decode("ascii")


def decode_tensors(blob: str) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `encode_tensors`; raises `BadRequest` for a blob that is not safetensors."""
    from safetensors.torch import load

    try:
        return list(load(base64.b64decode(blob, validate=True)).items())
    except Exception as err:  # binascii.Error, SafetensorError
        raise BadRequest(
            f"serialized_named_tensors holds a blob that is not base64 safetensors ({err}); send "
            "miles_core.serve.protocol.encode_tensors output."
        ) from err
