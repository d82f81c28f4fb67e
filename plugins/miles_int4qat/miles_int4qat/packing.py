"""Per-group symmetric INT4 quantization and its packed storage: eight 4-bit values per int32.

The layout is compressed-tensors' ``pack-quantized`` one (what SGLang and vLLM load): a value ``q`` in
[-8, 7] is stored as the nibble ``q + 8``; value ``i`` of each run of eight along the last dimension sits
at bits ``4*i .. 4*i+3`` of one int32. Groups run along the last (input) dimension of a weight.
"""

from __future__ import annotations

import torch

from miles_core import UsageError

QMAX = 7  # symmetric: [-7, 7]; -8 is never produced, so dequantization is exactly q * scale
SCALE_MIN = 1e-5
PACK = 8  # nibbles per int32
# Scales are held in bf16, as compressed-tensors checkpoints and the rollout engines hold them. They are
# rounded to bf16 *before* the weights are divided by them, so training (fake quant), the engine and an
# exported checkpoint all see exactly the same q * scale; a scale kept in fp32 for training only would
# shift every weight of a group by the same relative error in the rollout (a correlated mismatch).
SCALE_DTYPE = torch.bfloat16
_SHIFTS = torch.arange(PACK, dtype=torch.int32) * 4


def check_group_size(dim: int, group_size: int, what: str = "weight") -> None:
    """Raise UsageError unless ``group_size`` is a positive multiple of 8 that divides ``dim``."""
    if group_size <= 0 or group_size % PACK:
        raise UsageError(
            f"--int4-group-size {group_size} is not a positive multiple of 8; pass e.g. 32, 64 or 128."
        )
    if dim % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if dim % g == 0]
        hint = f" (e.g. {divisors[-1]})" if divisors else ""
        raise UsageError(
            f"--int4-group-size {group_size} does not divide the input dimension {dim} of {what}; "
            f"pass a --int4-group-size that divides it{hint}."
        )


def group_scales(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Scales ``[..., K / group_size]``: ``max(max|w| / 7, 1e-5)`` per group, rounded to bf16, as fp32."""
    check_group_size(w.shape[-1], group_size)
    g = w.detach().float().unflatten(-1, (-1, group_size))
    return (g.abs().amax(dim=-1) / QMAX).clamp(min=SCALE_MIN).to(SCALE_DTYPE).float()


def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 ``q`` in [-7, 7] shaped like ``w``, bf16-valued fp32 scales ``[..., K / group_size]``)."""
    scale = group_scales(w, group_size)
    g = w.detach().float().unflatten(-1, (-1, group_size))
    q = torch.clamp(torch.round(g / scale[..., None]), -QMAX, QMAX)
    return q.flatten(-2).to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim a multiple of 8 -> int32 ``[..., K / 8]``."""
    if q.shape[-1] % PACK:
        raise ValueError(f"the last dimension {q.shape[-1]} is not a multiple of 8; it cannot be packed")
    nib = (q.to(torch.int32) + 8).unflatten(-1, (-1, PACK))
    # Bits 28..31 hold the top nibble; the int32 sum wraps exactly as two's complement, so the bit pattern
    # is the one compressed-tensors writes (values >= 8 there give negative int32s, which is fine).
    return (nib << _SHIFTS.to(q.device)).sum(dim=-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., K / 8]`` -> int8 ``[..., K]`` in [-8, 7] (the exact inverse of `pack_int4`)."""
    nib = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    return (nib - 8).flatten(-2).to(torch.int8)


def dequantize(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Packed int32 ``[..., K/8]`` and scales ``[..., K/g]`` -> ``[..., K]`` in ``dtype`` (q * scale)."""
    q = unpack_int4(packed).unflatten(-1, (-1, group_size))
    return (q.to(dtype) * scales.to(dtype)[..., None]).flatten(-2)


def quantize_pack(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., K]`` -> (packed int32 ``[..., K/8]``, bf16-valued fp32 scales ``[..., K/g]``)."""
    q, scale = quantize(w, group_size)
    return pack_int4(q), scale
