"""Route tables: decoding SGLang's payload, checking a sample's routes against the model, comparing two.

A route table is int32 ``[len(tokens) - 1, num_moe_layers, topk]``: row ``t`` holds the experts token ``t``
was sent to in each MoE layer when it was the input. Everything here is stateless; the per-run policy
(when to record, when to replay) lives in ``replay.py``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from miles_core import UsageError

INDEX_BYTES = 4  # int32 expert ids, the format both the engine and SGLang report


@dataclass(frozen=True)
class RouteShape:
    """What a route table must look like for one model: MoE layers, experts per token, experts in all."""

    num_layers: int
    topk: int
    num_experts: int

    @classmethod
    def of_model(cls, model: Any) -> RouteShape:
        """Read the shape from a built-in model's ``config`` (``miles_core.model.ModelConfig``)."""
        config = getattr(model, "config", None)
        layers = list(getattr(config, "moe_layer_ids", []) or [])
        if not layers:
            arch = getattr(config, "architecture", type(model).__name__)
            raise UsageError(
                f"routing replay needs a mixture-of-experts model but {arch} has no MoE layers; "
                "drop --use-rollout-routing-replay / --use-routing-replay / --record-routing-mismatch."
            )
        return cls(len(layers), int(config.num_experts_per_tok), int(config.num_experts))

    def table(self, num_tokens: int) -> tuple[int, int, int]:
        """The shape of the table for a sample of ``num_tokens`` tokens."""
        return (num_tokens - 1, self.num_layers, self.topk)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.topk * INDEX_BYTES


def decode_sglang_routes(meta_info: dict, num_tokens: int, num_layers: int, topk: int) -> np.ndarray:
    """Decode SGLang's ``meta_info["routed_experts"]`` (base64 of int32) into ``[num_tokens-1, L, k]``.

    :param meta_info: the ``meta_info`` dict of an SGLang ``/generate`` response.
    :param num_tokens: ``len(sample.tokens)``, prompt plus response.
    :raises UsageError: the payload is missing, not base64, or not ``(num_tokens-1) * L * k`` int32s.
    """
    payload = meta_info.get("routed_experts") if isinstance(meta_info, dict) else None
    if payload is None:
        raise UsageError(
            "the SGLang response has no meta_info['routed_experts']; launch SGLang with "
            "--enable-return-routed-experts and send return_routed_experts=True with each request."
        )
    flat = decode_payload(payload)
    want = (num_tokens - 1, num_layers, topk)
    if flat.size != int(np.prod(want)):
        raise UsageError(
            f"SGLang routed_experts holds {flat.size} expert ids but {num_tokens} tokens with {num_layers} "
            f"MoE layers and top-{topk} need {int(np.prod(want))}; check that SGLang serves this checkpoint."
        )
    return flat.reshape(want)


def decode_payload(payload: str | bytes) -> np.ndarray:
    """Base64 text of little-endian int32s -> a flat int32 array."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise UsageError(f"routed_experts is not valid base64 ({err}); check the rollout server.") from err
    if len(raw) % INDEX_BYTES:
        raise UsageError(
            f"routed_experts decodes to {len(raw)} bytes, not a whole number of int32s; "
            "check the rollout server."
        )
    return np.frombuffer(raw, dtype="<i4").astype(np.int32)


def check_routes(routes: Any, sample_index: Any, num_tokens: int, shape: RouteShape) -> np.ndarray:
    """Return ``routes`` as a contiguous int32 ``[num_tokens-1, L, k]`` array, or raise one sentence.

    A 2-D ``[num_tokens-1, L*k]`` table (base64 payloads stored before the model shape was known) is
    reshaped. Expert ids must lie in ``[0, num_experts)``.
    """
    arr = np.asarray(routes.cpu() if isinstance(routes, torch.Tensor) else routes)
    want = shape.table(num_tokens)
    if arr.ndim == 2 and arr.shape == (want[0], want[1] * want[2]):
        arr = arr.reshape(want)
    if arr.shape != want:
        raise UsageError(
            f"sample {sample_index} has routed experts of shape {tuple(arr.shape)} but the model needs "
            f"{want} (len(tokens)-1, MoE layers, top-k); regenerate the rollout with this checkpoint."
        )
    if arr.size and (arr.min() < 0 or arr.max() >= shape.num_experts):
        raise UsageError(
            f"sample {sample_index} has routed expert ids in [{arr.min()}, {arr.max()}] but the model has "
            f"{shape.num_experts} experts; regenerate the rollout with this checkpoint."
        )
    return np.ascontiguousarray(arr, dtype=np.int32)


def placeholder_routes(num_tokens: int, shape: RouteShape) -> np.ndarray:
    """Experts ``0..k-1`` for every row: a stand-in for samples that do not train (loss mask all zero)."""
    row = np.arange(shape.topk, dtype=np.int32)
    return np.ascontiguousarray(np.broadcast_to(row, shape.table(num_tokens)))


@dataclass
class MismatchCount:
    """Counts behind ``routing_mismatch_frac``: (token, layer, slot) entries and tokens that differ."""

    entries: int = 0
    differing_entries: int = 0
    tokens: int = 0
    differing_tokens: int = 0  # tokens that differ in at least one (layer, slot)

    def __add__(self, other: MismatchCount) -> MismatchCount:
        return MismatchCount(
            self.entries + other.entries,
            self.differing_entries + other.differing_entries,
            self.tokens + other.tokens,
            self.differing_tokens + other.differing_tokens,
        )

    @property
    def entry_frac(self) -> float:
        return self.differing_entries / max(self.entries, 1)

    @property
    def token_frac(self) -> float:
        return self.differing_tokens / max(self.tokens, 1)


def _long(table: Any) -> torch.Tensor:
    if isinstance(table, torch.Tensor):
        return table.detach().cpu().long()
    return torch.from_numpy(np.ascontiguousarray(table)).long()


def count_mismatch(reference: Any, other: Any) -> MismatchCount:
    """Compare two ``[T, L, k]`` tables as sets per (token, layer): slot order does not matter.

    An entry of ``reference`` differs when its expert is absent from ``other``'s set for that token and
    layer (top-k sets hold distinct experts, so this counts the size of the set difference).
    """
    a, b = _long(reference), _long(other)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare route tables of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    missing = ~(a[..., :, None] == b[..., None, :]).any(-1)  # [T, L, k]
    return MismatchCount(
        entries=missing.numel(),
        differing_entries=int(missing.sum()),
        tokens=a.shape[0],
        differing_tokens=int(missing.flatten(1).any(-1).sum()) if a.shape[0] else 0,
    )
