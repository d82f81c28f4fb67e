"""Fused one-pass FP8 quantization on CUDA (Triton) for the per-row tilings: rowwise and 1x128 blocks.

Eager PyTorch spends about five passes over an activation (amax, scale, reciprocal, multiply+clamp, cast);
this kernel reads the bf16/fp32 tile once into registers and writes the e4m3 codes and the fp32 scale.
It does the same IEEE operations as `miles_fp8.quant` (exact amax, ``scale = amax / 448`` rounded to
nearest, ``inv = 1 / scale`` rounded to nearest, one fp32 multiply, clamp, round-to-nearest-even cast),
so it is bit-identical to ``quant.quantize``; a probe on first use checks that on this device and falls
back to the eager path (with a warning) if it is not. Triton is imported lazily: CPU installs never need it.
"""

from __future__ import annotations

import logging

import torch

from miles_fp8.quant import BLOCK, FP8_DTYPE

log = logging.getLogger(__name__)
MAX_COLS = 16384  # widest row handled in one register tile (rowwise); wider rows use the eager path
_kernel = None  # the compiled Triton kernel, or False when Triton is missing / the probe failed
_state: str | None = None  # None: not probed yet; "ok" or the reason it is off
# --no-fp8-triton (quant.configure_kernels; or ENABLED = False, as bench/fp8_gemm.py does) forces the
# eager path.
ENABLED = True
launches = 0  # fused kernel calls so far (tests check the GPU layers really take this path)


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_rows_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, n_groups,
        GW: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr,
    ):  # fmt: skip
        # One program: BM rows x one group of GW columns (GP = GW rounded up to a power of two).
        pid_m, pid_g = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        offs = tl.arange(0, GP)
        cols = pid_g * GW + offs
        mask = (rows[:, None] < M) & (offs[None, :] < GW) & (cols[None, :] < K)
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)  # exact; padding reads 0 and never raises it
        # div_rn: IEEE round-to-nearest division, as torch's tensor/tensor division and reciprocal.
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))  # FP8_MAX (no globals)
        scale = tl.where(amax > 0, scale, 1.0)  # an all-zero tile encodes as zeros with scale 1
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        y = x * inv[:, None]
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], y.to(tl.float8e4nv), mask=mask)
        tl.store(s_ptr + rows64 * n_groups + pid_g, scale, mask=rows < M)

    return quant_rows_kernel


def _launch(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    import triton

    global launches
    launches += 1
    m, k = x.shape
    gw = min(group, k) if group else k
    n_groups = -(-k // gw)
    gp = triton.next_power_of_2(gw)
    bm = max(1, min(64, 4096 // gp))  # ~4096 elements per program: enough bytes in flight per SM
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm), n_groups)
    warps = 8 if bm * gp >= 4096 else 4
    _kernel[grid](x, q, s, m, k, x.stride(0), q.stride(0), n_groups, GW=gw, GP=gp, BM=bm, num_warps=warps)
    return q, s


def supports(x: torch.Tensor, tile: tuple[int, int]) -> bool:
    """True if the fused kernel covers this call: CUDA, 2-D, unit stride along rows, rowwise or 1xN tiles."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.stride(-1) == 1
        and tile[0] in (0, 1)
        and (tile[0] == 1 or x.shape[0] == 1)  # (0, c) tiles span rows unless there is only one row
        and 0 < x.shape[0]
        and 0 < x.shape[1] <= MAX_COLS
        and tile[1] in (0, BLOCK)
    )


def _probe() -> str:
    """Compile the kernel and check it against the eager quantization on awkward inputs."""
    global _kernel
    try:
        _kernel = _build_kernel()
    except Exception as e:  # no Triton or no compiler on this machine
        _kernel = False
        return f"triton unavailable ({e})"
    from miles_fp8.quant import quantize

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(67, 1000, device="cuda", generator=g).pow(3)
    x[3] = 0  # an all-zero row
    x[5, :130] = 1e30  # saturating and tile-crossing values
    for dtype in (torch.bfloat16, torch.float32):
        for tile in ((1, 0), (1, BLOCK)):
            xd = x.to(dtype)
            q1, s1 = _launch(xd, tile[1])
            q2, s2 = quantize(xd, tile)
            if not (torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)):
                _kernel = False
                return f"differs from the eager quantization for tile {tile}, {dtype}"
    return "ok"


def quantize_rows(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``quant.quantize(x, tile)`` in one fused pass, or None when the kernel does not apply (the caller
    then runs the eager path). Output layouts equal quantize's: q like x, scale [M, ceil(K / tile)]."""
    global _state
    if not ENABLED or not supports(x, tile):
        return None
    if _state is None:
        _state = _probe()
        if _state != "ok":
            log.warning("fused FP8 quantization off: %s; using the eager path", _state)
    if _state != "ok":
        return None
    return _launch(x, tile[1])


def status() -> str | None:
    """None before the first CUDA call, "ok" when the fused kernel is in use, else why it is not."""
    return _state
