"""The one FP8 quantization function of miles-fp8, shared by the rollout engine and the training forward.

A tensor is cut into tiles over its last two dims; each tile gets one fp32 scale (the *decode* multiplier,
HF's ``weight_scale_inv``: ``x ~= q * scale``) chosen so that the tile's largest magnitude maps to the
largest e4m3 value (448). Recipes: ``blockwise`` (128x128 weight blocks, 1x128 activation tiles, as
DeepSeek-V3 / Qwen3-FP8 checkpoints), ``rowwise`` (one scale per weight row / token) and ``tensorwise``.
Dims that are not a multiple of the tile are zero-padded into partial tiles (zeros never raise an amax).
Every step is exact except one fp32 division and one multiply per element, so CPU and CUDA agree bitwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from miles_core import UsageError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """Tile shapes (rows, cols) over a tensor's last two dims; 0 means the whole dim."""

    name: str
    weight_tile: tuple[int, int]
    act_tile: tuple[int, int]


RECIPES = {
    "blockwise": Recipe("blockwise", (BLOCK, BLOCK), (1, BLOCK)),
    "rowwise": Recipe("rowwise", (1, 0), (1, 0)),
    "tensorwise": Recipe("tensorwise", (0, 0), (0, 0)),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UsageError(f"unknown --fp8-recipe {name!r}; choose one of {', '.join(RECIPES)}.")
    return RECIPES[name]


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise UsageError naming `name` if `x` holds NaN or Inf (FP8 has no Inf; a NaN scale poisons a tile)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise UsageError(
            f"tensor {name!r} has {bad} NaN/Inf value(s) and cannot be quantized to FP8; fix the checkpoint "
            "or lower the learning rate so training stays finite."
        )


def _tiles(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """View `x` [..., R, C] (1-D gets R=1) as [..., R/tr, tr, C/tc, tc], zero-padding partial tiles."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    rows, cols = x.shape[-2], x.shape[-1]
    # A dim that fits in one tile is one whole tile: same amax and scale shape, no padding copy.
    tr = tile[0] if 0 < tile[0] < rows else rows
    tc = tile[1] if 0 < tile[1] < cols else cols
    pr, pc = -rows % tr, -cols % tc
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    lead = x.shape[:-2]
    return x.reshape(*lead, (rows + pr) // tr, tr, (cols + pc) // tc, tc), rows, cols


def _untile(t: torch.Tensor, rows: int, cols: int, shape: torch.Size) -> torch.Tensor:
    lead = t.shape[:-4]
    t = t.reshape(*lead, t.shape[-4] * t.shape[-3], t.shape[-2] * t.shape[-1])
    return t[..., :rows, :cols].reshape(shape)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 decode scale per tile; an all-zero tile gets 1.0 so it encodes as zeros, never 0/0."""
    amax = amax.float()
    # Tensor / tensor on purpose: CUDA turns division by a Python scalar into a multiply by its
    # reciprocal, which would make GPU scales differ from CPU ones in the last bit.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return torch.where(amax > 0, scale, torch.ones_like(amax))


def _encode(tiles: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    # The clamp only matters for scales not derived from this tensor (e.g. loaded): amax maps to <= 448.
    return (tiles.float() * inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _tile_amax(tiles: torch.Tensor) -> torch.Tensor:
    # max |x| per tile in one pass without materialising |x|; exact in any dtype.
    return torch.linalg.vector_norm(tiles, ord=float("inf"), dim=(-3, -1))


def _quantize_tiles(tiles: torch.Tensor, amax_fn: Callable = _tile_amax, encode_fn: Callable = _encode):
    # Only the two elementwise passes over the data may be compiled; the tiny scale math stays eager
    # (IEEE division and reciprocal on every device), so fused and eager results are bit-identical.
    scale = scale_from_amax(amax_fn(tiles))
    return encode_fn(tiles, torch.reciprocal(scale)), scale


_cuda_impl: Callable | None = None
_compile = False  # --fp8-compile (configure_kernels)


def configure_kernels(compile: bool, triton: bool) -> None:
    """The run's kernel choices (``--fp8-compile``, ``--[no-]fp8-triton``), set once by the plugin."""
    global _compile, _cuda_impl
    from miles_fp8 import triton_blocks, triton_quant

    if compile != _compile:
        _cuda_impl = None  # choose again at the next call
    _compile = compile
    triton_quant.ENABLED = triton_blocks.ENABLED = triton


def _cuda_quantizer() -> Callable:
    """With --fp8-compile: `_quantize_tiles` with its amax and encode passes compiled by torch.compile,
    used only if a probe reproduces the eager result bit for bit (rollout and training agree); else eager."""
    global _cuda_impl
    if _cuda_impl is None:
        _cuda_impl = _quantize_tiles
        if _compile:  # opt-in: see README (slower as of torch 2.11)
            try:
                amax_c = torch.compile(_tile_amax, dynamic=True)
                enc_c = torch.compile(_encode, dynamic=True)

                def fused(tiles: torch.Tensor):
                    return _quantize_tiles(tiles, amax_c, enc_c)

                probe = torch.randn(4, 3, 256, 384, device="cuda").pow(3)
                probe[0] = 0  # all-zero tiles
                tiles = _tiles(probe, (1, BLOCK))[0]
                (q1, s1), (q2, s2) = fused(tiles), _quantize_tiles(tiles)
                if torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2):
                    _cuda_impl = fused
                else:
                    log.warning("compiled FP8 quantization differs from eager; using eager")
            except Exception as e:  # no Triton / compiler: the eager version is the same math
                log.warning("torch.compile unavailable for FP8 quantization (%s); using eager", e)
    return _cuda_impl


def quantize(
    x: torch.Tensor, tile: tuple[int, int], *, name: str | None = None, fast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` [..., R, C] to e4m3 with one fp32 scale per tile of its last two dims.

    :param tile: (rows, cols) of a tile, 0 = whole dim; e.g. (128, 128) weights, (1, 128) activations.
    :param name: when given, NaN/Inf raise UsageError naming this tensor (weights are checked; activations
        are not, to keep the forward free of host syncs).
    :param fast: on CUDA, use a fused kernel when it is bitwise equal to eager: the Triton one-pass kernels
        (`miles_fp8.triton_quant` for 2-D rowwise / 1x128 tiles, `miles_fp8.triton_blocks` for 128x128
        blocks of 2-D / 3-D weights), else torch.compile'd passes if opted in.
    :returns: ``(q, scale)``: q float8_e4m3fn shaped like x; scale fp32 [..., ceil(R/tr), ceil(C/tc)].
    """
    if name is not None:
        check_finite(x, name)
    if fast and x.is_cuda:
        # one fused pass for per-row tiles and for 128x128 weight blocks (bitwise equal, probed)
        from miles_fp8 import triton_blocks, triton_quant

        fused = triton_quant.quantize_rows(x, tile)
        if fused is None:
            fused = triton_blocks.quantize_blocks(x, tile)
        if fused is not None:
            return fused
    tiles, rows, cols = _tiles(x, tile)
    impl = _cuda_quantizer() if fast and x.is_cuda else _quantize_tiles
    q, scale = impl(tiles)
    return _untile(q, rows, cols, x.shape), scale


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize`: ``q * scale`` per tile, in fp32 then cast to `dtype`."""
    tiles, rows, cols = _tiles(q.float(), tile)
    if tuple(scale.shape[-2:]) != (tiles.shape[-4], tiles.shape[-2]):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match {tuple(q.shape)} in tiles {tile}")
    return _untile(tiles * scale[..., :, None, :, None], rows, cols, q.shape).to(dtype)


def fake_quant(x: torch.Tensor, tile: tuple[int, int], *, name: str | None = None) -> torch.Tensor:
    """quantize -> dequantize (what the emulated FP8 matmul multiplies), cast back to x's dtype."""
    return quantize_dequantize(x, tile, name=name).to(x.dtype)


def quantize_dequantize(x: torch.Tensor, tile: tuple[int, int], *, name: str | None = None) -> torch.Tensor:
    """fp32 ``dequantize(*quantize(x, tile), tile)`` computed without leaving tile space (fewer ops for
    the CPU emulation; the same operations on the same values, so bitwise equal)."""
    if name is not None:
        check_finite(x, name)
    tiles, rows, cols = _tiles(x, tile)
    q, scale = _quantize_tiles(tiles)
    return _untile(q.float() * scale[..., :, None, :, None], rows, cols, x.shape)
