"""Fused one-pass FP8 quantization of weights in 128x128 blocks (Triton), bit-identical to `quant.quantize`.

The unified-FP8 trainer quantizes every master weight on every forward (all E experts of a layer at
once). Eager PyTorch spends about 33 bytes of memory traffic an element on it (a copy of the strided
gate/up view, amax, an fp32 copy, the multiply, the clamp, the cast); this kernel loads each 128x128 block
once into registers, takes its exact amax and writes the e4m3 codes and the block's fp32 scale: 3 bytes
an element from bf16. It does `quant.quantize`'s IEEE operations (``scale = amax / 448`` and ``inv = 1 /
scale`` rounded to nearest, one fp32 multiply, clamp, round-to-nearest-even cast), so the codes and scales
are the same bits; a probe on first use checks that on this card (awkward values, partial blocks,
strided input, bf16 and fp32) and falls back to the eager path, with a warning, if they are not.
Under Triton's interpreter (the CPU tests) the e4m3 rounding is done in arithmetic (its casts truncate).
"""

from __future__ import annotations

import logging

import torch

from miles_fp8 import triton_fp8
from miles_fp8.quant import BLOCK, FP8_DTYPE

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the eager quantization serves
    triton = None
    tl = None

log = logging.getLogger(__name__)
ENABLED = True  # --no-fp8-triton (`quant.configure_kernels`) turns it off with the per-row kernel
_state: dict[int, str] = {}  # CUDA device index -> "ok" or why the kernel is off there

if triton is not None:
    from miles_fp8.triton_fp8 import _round_e4m3  # noqa: F401  (the kernel's global)

    @triton.jit
    def _quant_blocks_kernel(
        x_ptr, q_ptr, s_ptr, rows, cols, stride_xe, stride_xr, s_rows, s_cols, TB: tl.constexpr,
        MODE: tl.constexpr,
    ):  # fmt: skip
        # One program: the TB x TB block (pid 0, pid 1) of x[e] ([E, rows, cols], unit column stride).
        e = tl.program_id(2).to(tl.int64)
        r = tl.program_id(0) * TB + tl.arange(0, TB)
        c = tl.program_id(1) * TB + tl.arange(0, TB)
        ok = (r[:, None] < rows) & (c[None, :] < cols)
        r64 = r[:, None].to(tl.int64)
        x = tl.load(x_ptr + e * stride_xe + r64 * stride_xr + c[None, :], mask=ok, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)  # exact; padding reads 0 and never raises it
        one = tl.full([1], 1.0, tl.float32)
        scale = tl.math.div_rn(one * amax, one * 448.0)  # FP8_MAX; IEEE division as torch's
        scale = tl.where(amax > 0, scale, 1.0)  # an all-zero block encodes as zeros with scale 1
        inv = tl.math.div_rn(one, scale)
        y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        if MODE == "fp32":  # the interpreter's cast truncates: round first (keeping -0), then it is exact
            r_y = _round_e4m3(y)
            y = tl.where(r_y == 0, y * 0.0, r_y)
        tl.store(q_ptr + e * rows * cols + r64 * cols + c[None, :], y.to(tl.float8e4nv), mask=ok)
        s_off = e * s_rows * s_cols + tl.program_id(0) * s_cols + tl.program_id(1) + tl.arange(0, 1)
        tl.store(s_ptr + s_off, scale)


def launch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.quantize(x, (128, 128))`` of a 2-D or 3-D x with unit column stride, by the kernel."""
    x3 = x if x.dim() == 3 else x[None]
    num, rows, cols = x3.shape
    s_rows, s_cols = triton.cdiv(rows, BLOCK), triton.cdiv(cols, BLOCK)
    q = torch.empty(x3.shape, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(num, s_rows, s_cols, dtype=torch.float32, device=x.device)
    if x3.numel():
        mode = "fp32" if x.device.type == "cpu" else "cuda"
        cfg = {} if triton_fp8.interpreted() else {"num_warps": 8}
        grid = (s_rows, s_cols, num)
        _quant_blocks_kernel[grid](
            x3, q, s, rows, cols, x3.stride(0), x3.stride(1), s_rows, s_cols, TB=BLOCK, MODE=mode, **cfg
        )
    return (q, s) if x.dim() == 3 else (q[0], s[0])


def supports(x: torch.Tensor, tile: tuple[int, int]) -> bool:
    """CUDA, 128x128 tiles, 2-D or 3-D, bf16 / fp16 / fp32 with unit column stride."""
    return (
        triton is not None
        and x.is_cuda
        and tuple(tile) == (BLOCK, BLOCK)
        and x.dim() in (2, 3)
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.stride(-1) == 1
    )


def _probe(device: torch.device) -> str:
    from miles_fp8.quant import quantize

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(3, 300, 2 * 200, device=device, generator=g).pow(3)
    w[0, :128, :128] = 0  # an all-zero block
    w[1, 5, :130] = 1e30  # saturating values across a block edge
    w[2, 7:9] *= 1e-30  # tiny values
    try:
        for dtype in (torch.bfloat16, torch.float32):
            x = w.to(dtype)[:, :, 10:210]  # strided, partial blocks both ways
            for t in (x, x[1]):
                (q1, s1), (q2, s2) = launch(t), quantize(t, (BLOCK, BLOCK))
                if not (torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)):
                    return f"differs from the eager quantization ({dtype}, {t.dim()}-D)"
    except Exception as e:  # no compiler for this card
        return f"triton unavailable ({e})"
    return "ok"


def quantize_blocks(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``quant.quantize(x, tile)`` in one fused pass, or None where the kernel does not apply (the caller
    then runs the eager path): q contiguous like x, scale ``[..., ceil(R/128), ceil(C/128)]``."""
    if not ENABLED or not supports(x, tile):
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _state:
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return None  # never probe inside a capture or trace: the eager path gives the same bits
        _state[index] = _probe(x.device)
        if _state[index] != "ok":
            log.warning("fused 128x128 FP8 weight quantization off: %s; using the eager path", _state[index])
    return launch(x) if _state[index] == "ok" else None
