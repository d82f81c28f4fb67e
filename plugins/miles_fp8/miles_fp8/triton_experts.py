"""Grouped FP8 expert kernels (Triton) for the blockwise recipe: every routed expert of an MoE layer in two
launches, no host sync, so the engine captures FP8 decode steps in CUDA graphs.

`Fp8Experts` in rollout mode calls `fp8_experts` on CUDA (and under Triton's interpreter in the CPU tests)
instead of its per-expert loop, which reads the expert counts back to the host. The dispatch is the core's
(`expert_order`, `expert_bounds`). Two kernels, each over a static grid of (expert, output tile):

1. gate/up + SwiGLU: for each 128-column block of K, the expert's rows of x are read straight from the
   token rows and quantized in registers to e4m3 with one scale per (row, block), the same IEEE steps as
   `quant.quantize` (``scale = amax / 448``, ``inv = 1 / scale``, multiply, clamp, round to nearest even);
   the FP8 product is accumulated in fp32 and scaled by the row's activation scale times the 128x128
   weight block's scale (`HF weight_scale_inv`);
2. down: the same over the SwiGLU activations. The gate and up outputs, silu(gate), their product and
   the output are rounded to x's dtype as the per-expert loop rounds them, so in bf16 the kernels give the
   loop's numbers up to the order of the fp32 sums (bit for bit under the interpreter).

The kernels need a card with e4m3 (compute capability 8.9+); the products run on its FP8 tensor cores, or
in bf16 (exact for e4m3 values) if this Triton cannot compile the FP8 dot. Under the interpreter they run
in fp32, with the e4m3 rounding done in fp32 arithmetic (the interpreter's own fp8 cast does not round to
nearest).
"""

from __future__ import annotations

import logging
import os

import torch

from miles_fp8.quant import BLOCK

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the per-expert loop serves
    triton = None
    tl = None

log = logging.getLogger(__name__)
DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64  # rows of one expert per tile
GATE_UP = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
DOWN = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_fp8_dot_failed = False  # an FP8 tensor-core dot failed to compile here once: bf16 products from then on
# CUDA device index -> compute capability >= 8.9, filled on first use (before any compiled step: the
# engine asks `cuda_graph_safe` first), so a compiled decode step reads a dict instead of the driver.
_e4m3_cards: dict[int, bool] = {}


# Off on CUDA until the GPU tests pass: on an H100 (2026-12-07) an engine decoding through CUDA graphs
# with these kernels sampled other greedy tokens than the same engine decoding eagerly, from the second
# token on (tests/test_fp8_triton_experts.py, `pytest -m gpu`, which turns this on). Rollout experts run
# the per-expert loop on CUDA meanwhile.
ENABLED_ON_CUDA = False


def device_ok(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: a CUDA card with e4m3 support (compute capability 8.9+:
    Ada, Hopper and later) once `ENABLED_ON_CUDA`, or the CPU under Triton's interpreter."""
    if triton is None:
        return False
    if device.type == "cuda":
        if not ENABLED_ON_CUDA:
            return False
        i = device.index if device.index is not None else torch.cuda.current_device()
        if i not in _e4m3_cards:
            _e4m3_cards[i] = torch.cuda.get_device_capability(i) >= (8, 9)
        return _e4m3_cards[i]
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device (see `device_ok`)."""
    return device_ok(x.device)


if triton is not None:

    @triton.jit
    def _round_e4m3(y):
        """fp32 ``y`` (|y| <= 448) rounded to the nearest e4m3 value (ties to even), as fp32: the step is
        2^(e-3) for exponent e >= -6 (normals), 2^-9 below (subnormals); the add-subtract of 1.5 * 2^23
        rounds to an integer, exactly, in round-to-nearest-even."""
        bits = y.to(tl.int32, bitcast=True)
        e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        return ((y / step + 12582912.0) - 12582912.0) * step

    @triton.jit
    def _rounded(x, dt, MODE: tl.constexpr):
        """fp32 ``x`` rounded to dtype ``dt`` (nearest even), kept in fp32. The interpreter's own casts
        to bf16 truncate, so there bf16 is rounded in integer arithmetic first (then the cast is exact)."""
        if MODE == "fp32":
            if dt == tl.bfloat16:
                bits = x.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)

    @triton.jit
    def _quant_rows(x, MODE: tl.constexpr):
        """x [BM, BK] (one 128-column block) -> (codes in the dot's dtype, fp32 scale [BM]) as `quant`."""
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
        scale = tl.where(amax > 0, scale, 1.0)  # an all-zero tile encodes as zeros with scale 1
        inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
        y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        if MODE == "fp32":
            q = _round_e4m3(y)
        elif MODE == "bf16":
            q = y.to(tl.float8e4nv).to(tl.bfloat16)
        else:
            q = y.to(tl.float8e4nv)
        return q, scale

    @triton.jit
    def _dot(a, w, MODE: tl.constexpr):
        """a [BM, BK] codes from `_quant_rows`, w [BN, BK] e4m3 -> fp32 [BM, BN], exact products."""
        if MODE == "fp32":
            return tl.dot(a, tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif MODE == "bf16":
            return tl.dot(a, tl.trans(w.to(tl.bfloat16)))
        else:
            return tl.dot(a, tl.trans(w))

    @triton.jit
    def _fp8_gate_up_kernel(
        x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, src_ptr, bounds_ptr, out_ptr, hidden, inter, stride_x,
        n_chunks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        kb = tl.cdiv(hidden, BLOCK_K)
        e64 = e.to(tl.int64)
        w_off = e64 * inter * hidden + n[:, None] * hidden  # gate_proj / up_proj [E, I, H]
        s_off = e64 * tl.cdiv(inter, BLOCK_K) * kb + (n // BLOCK_K) * kb  # scales [E, I/128, H/128]
        kk = tl.arange(0, BLOCK_K)
        # Static loop bound, empty chunks skipped: a data-dependent bound would need a host sync.
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < end
                src = tl.load(src_ptr + m, mask=m_ok, other=0)
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for b in range(0, kb):
                    k = b * BLOCK_K + kk
                    k_ok = k < hidden
                    xmask = m_ok[:, None] & k_ok[None, :]
                    xt = tl.load(x_ptr + src[:, None] * stride_x + k[None, :], mask=xmask, other=0.0)
                    xq, xs = _quant_rows(xt, MODE)
                    wmask = n_ok[:, None] & k_ok[None, :]
                    wg = tl.load(wg_ptr + w_off + k[None, :], mask=wmask, other=0.0)
                    wu = tl.load(wu_ptr + w_off + k[None, :], mask=wmask, other=0.0)
                    sg = tl.load(sg_ptr + s_off + b, mask=n_ok, other=0.0)
                    su = tl.load(su_ptr + s_off + b, mask=n_ok, other=0.0)
                    acc_g += _dot(xq, wg, MODE) * (xs[:, None] * sg[None, :])
                    acc_u += _dot(xq, wu, MODE) * (xs[:, None] * su[None, :])
                # SwiGLU rounded as the per-expert loop and the trainer round it: gate and up outputs
                # to x's dtype, silu(gate) to x's dtype, then the product (a no-op for fp32).
                dt = out_ptr.dtype.element_ty
                g = _rounded(acc_g, dt, MODE)
                act = _rounded(_rounded(g * tl.sigmoid(g), dt, MODE) * _rounded(acc_u, dt, MODE), dt, MODE)
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(out_ptr + m[:, None] * inter + n[None, :], act.to(dt), mask=omask)

    @triton.jit
    def _fp8_down_kernel(
        a_ptr, w_ptr, s_ptr, bounds_ptr, out_ptr, hidden, inter, n_chunks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        kb = tl.cdiv(inter, BLOCK_K)
        e64 = e.to(tl.int64)
        w_off = e64 * hidden * inter + n[:, None] * inter  # down_proj [E, H, I]
        s_off = e64 * tl.cdiv(hidden, BLOCK_K) * kb + (n // BLOCK_K) * kb
        kk = tl.arange(0, BLOCK_K)
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for b in range(0, kb):
                    k = b * BLOCK_K + kk
                    k_ok = k < inter
                    amask = m_ok[:, None] & k_ok[None, :]
                    a = tl.load(a_ptr + m[:, None] * inter + k[None, :], mask=amask, other=0.0)
                    aq, as_ = _quant_rows(a, MODE)
                    w = tl.load(w_ptr + w_off + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    s = tl.load(s_ptr + s_off + b, mask=n_ok, other=0.0)
                    acc += _dot(aq, w, MODE) * (as_[:, None] * s[None, :])
                omask = m_ok[:, None] & n_ok[None, :]
                dt = out_ptr.dtype.element_ty
                y = _rounded(acc, dt, MODE).to(dt)
                tl.store(out_ptr + m[:, None] * hidden + n[None, :], y, mask=omask)


def _mode() -> str:
    """How the kernels multiply: ``fp32`` under the interpreter, else on FP8 tensor cores (bf16 fallback)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "fp32"
    return "bf16" if _fp8_dot_failed else "fp8"


def _launch_config(cfg: dict) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"BLOCK_N": cfg["BLOCK_N"]}
    return dict(cfg)


def _run(x, src, bounds, weights, act, out, mode: str) -> None:
    gate, up, down, gate_s, up_s, down_s = weights
    num_experts, inter, hidden = gate.shape
    m = src.numel()
    block_m = DECODE_BLOCK_M if m <= DECODE_BLOCK_M * num_experts else PREFILL_BLOCK_M
    chunks = triton.cdiv(m, block_m)  # enough for an expert that got every copy
    c1, c2 = _launch_config(GATE_UP), _launch_config(DOWN)
    common = dict(BLOCK_M=block_m, BLOCK_K=BLOCK, MODE=mode)
    grid1 = (num_experts, triton.cdiv(inter, c1["BLOCK_N"]))
    _fp8_gate_up_kernel[grid1](
        x, gate, up, gate_s, up_s, src, bounds, act, hidden, inter, x.stride(0), chunks, **common, **c1
    )
    grid2 = (num_experts, triton.cdiv(hidden, c2["BLOCK_N"]))
    _fp8_down_kernel[grid2](act, down, down_s, bounds, out, hidden, inter, chunks, **common, **c2)


@torch.library.custom_op("miles_fp8::fp8_experts", mutates_args=())
def fp8_experts(
    x: torch.Tensor, src: torch.Tensor, bounds: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
    down: torch.Tensor, gate_scale: torch.Tensor, up_scale: torch.Tensor, down_scale: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Expert outputs for the token copies in expert-sorted order (blockwise FP8 weights).

    :param x: ``[N, H]`` token rows (bf16, fp16 or fp32).
    :param src: int32 ``[M]``: the token row of each sorted copy (``order // k``).
    :param bounds: int32 ``[E + 1]`` (`expert_bounds`): expert e owns sorted copies
        ``bounds[e] .. bounds[e+1]-1``.
    :param gate: e4m3 ``[E, I, H]``, ``up`` ``[E, I, H]``, ``down`` ``[E, H, I]``; ``*_scale``: fp32 decode
        scales of their 128x128 blocks, ``[E, ceil(I/128), ceil(H/128)]`` / ``[E, ceil(H/128), ceil(I/128)]``.
    :returns: ``[M, H]`` in x's dtype: ``down_e(silu(gate_e(x)) * up_e(x))`` per copy, with x and the
        SwiGLU activations quantized to e4m3 in 1x128 tiles.
    """
    global _fp8_dot_failed
    if triton is None:
        raise RuntimeError("fp8_experts needs triton (pip install triton)")
    x = x.contiguous()
    weights = tuple(t.contiguous() for t in (gate, up, down, gate_scale, up_scale, down_scale))
    m, hidden, inter = src.numel(), x.shape[1], gate.shape[1]
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    mode = _mode()
    try:
        _run(x, src, bounds, weights, act, out, mode)
    except Exception as e:  # an FP8 dot this Triton / card cannot compile: exact bf16 products instead
        if mode != "fp8":
            raise
        _fp8_dot_failed = True
        log.warning("FP8 tensor-core dot failed to compile (%s); the FP8 experts multiply in bf16", e)
        _run(x, src, bounds, weights, act, out, "bf16")
    return out


@fp8_experts.register_fake
def _(x, src, bounds, gate, up, down, gate_scale, up_scale, down_scale):
    return x.new_empty(src.shape[0], x.shape[1])
