"""FP8 codes back to bf16 / fp32 for the training backward's GEMMs, in one pass on CUDA.

`dequantize_into` writes ``quant.dequantize(q, scale, tile)`` (each code times its tile's fp32 scale, one
IEEE multiply, then rounded to the output's dtype to nearest even) into a given, possibly strided,
output: the experts' backward dequantizes all E experts' gate and up weights straight into the two halves
of one ``[E, 2I, H]`` buffer, for one grouped GEMM. On CUDA (and under Triton's interpreter) a Triton
kernel reads the e4m3 codes once and writes the output once (3 bytes an element for bf16, where the eager
``dequantize`` spends about 19 in fp32 temporaries); elsewhere the eager function, with the same result.
"""

from __future__ import annotations

import torch

from miles_fp8 import triton_fp8
from miles_fp8.quant import dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the eager dequantization serves
    triton = None
    tl = None

BLOCK_R, BLOCK_C = 32, 128

if triton is not None:
    from miles_fp8.triton_fp8 import _rounded  # noqa: F401  (the kernel's global)

    @triton.jit
    def _dequant_kernel(
        q_ptr, s_ptr, out_ptr, rows, cols, tile_r, tile_c, s_rows, s_cols, stride_qe, stride_qr,
        stride_oe, stride_or, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr,
    ):  # fmt: skip
        # Program (row block, column block, leading index e) of q [E, rows, cols] (unit column stride).
        e = tl.program_id(2).to(tl.int64)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (r[:, None] < rows) & (c[None, :] < cols)
        r64 = r[:, None].to(tl.int64)
        q = tl.load(q_ptr + e * stride_qe + r64 * stride_qr + c[None, :], mask=ok, other=0.0)
        s_idx = e * s_rows * s_cols + (r[:, None] // tile_r) * s_cols + c[None, :] // tile_c
        s = tl.load(s_ptr + s_idx, mask=ok, other=0.0)
        dt = out_ptr.dtype.element_ty
        y = _rounded(q.to(tl.float32) * s, dt, MODE).to(dt)
        tl.store(out_ptr + e * stride_oe + r64 * stride_or + c[None, :], y, mask=ok)


def _kernel_ok(q: torch.Tensor, out: torch.Tensor) -> bool:
    if triton is None or out.dtype not in (torch.bfloat16, torch.float32):
        return False
    if not (q.is_cuda or (q.device.type == "cpu" and triton_fp8.interpreted())):
        return False
    return q.dim() in (2, 3) and q.stride(-1) == 1 and out.stride(-1) == 1


def dequantize_into(
    q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:
    """``out[...] = dequantize(q, scale, tile)`` rounded to out's dtype; returns ``out``.

    :param q: e4m3 ``[R, C]`` or ``[E, R, C]``; ``scale``: fp32 ``[..., ceil(R/tr), ceil(C/tc)]``
        (`quant.quantize`'s layout; a tile dim of 0 or >= the tensor's dim is the whole dim).
    :param out: bf16 or fp32 (any other dtype: eager), q's shape, unit stride along the last dim.
    """
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"dequantize_into: out shape {tuple(out.shape)} != codes shape {tuple(q.shape)}")
    if not _kernel_ok(q, out):
        return out.copy_(dequantize(q, scale, tile))
    rows, cols = q.shape[-2], q.shape[-1]
    tr = tile[0] if 0 < tile[0] < rows else rows
    tc = tile[1] if 0 < tile[1] < cols else cols
    q3, o3 = (q, out) if q.dim() == 3 else (q[None], out[None])
    s = scale.contiguous()
    if tuple(s.shape[-2:]) != (-(-rows // tr), -(-cols // tc)):
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match {tuple(q.shape)} in tiles {tile}")
    if q3.numel() == 0:
        return out
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_C), q3.shape[0])
    mode = "fp32" if q.device.type == "cpu" else "cuda"  # fp32: the interpreter rounds in arithmetic
    _dequant_kernel[grid](
        q3, s, o3, rows, cols, tr, tc, s.shape[-2], s.shape[-1], q3.stride(0), q3.stride(1), o3.stride(0),
        o3.stride(1), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, MODE=mode,
    )  # fmt: skip
    return out


def dequantize_as(
    q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`dequantize_into` a new contiguous tensor of ``dtype``."""
    return dequantize_into(q, scale, tile, torch.empty(q.shape, dtype=dtype, device=q.device))
