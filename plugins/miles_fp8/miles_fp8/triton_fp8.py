"""Blockwise FP8 GEMM in Triton: the math shared by the grouped expert kernels and the dense `Fp8Linear`.

One kernel, `_fp8_rows_kernel`, computes ``out[m] = x[m] @ dequant(W).T`` for a range of rows: either
each expert's rows of a sorted batch (the experts' down projection, `miles_fp8.triton_experts`) or every
row of a dense linear (one expert over all rows, `fp8_linear`). Per (row, 128-column block of K) the
activation is quantized to e4m3 in registers with the IEEE steps of `quant.quantize` (``scale = amax /
448``, ``inv = 1 / scale``, one multiply, clamp, round to nearest even), multiplied with the e4m3 weight
block on FP8 tensor cores with fp32 accumulation, scaled by the row's activation scale times the 128x128
block's ``weight_scale_inv``, summed over K blocks in fp32 and rounded once to x's dtype. No host sync,
so CUDA graphs capture it.

Row independence: a row's result depends on that row and the weight only. The dense path always uses
the same tile (``DENSE["BLOCK_M"]`` rows, the column tile chosen from N alone), so the tensor-core
instruction and the summation order are the same for every M: a row gives the same bits alone, in a
decode batch, in the padded batch of a CUDA graph and in a prefill.

How the products run is decided once per process (`device_ok` probes it before the first use, never
under CUDA graph capture): e4m3 x e4m3 on FP8 tensor cores (compute capability 8.9+), or exact bf16
products of the same values if this Triton cannot compile that dot, or off (callers emulate) if neither
compiles. Under Triton's interpreter (the CPU tests) the products run in fp32 and the e4m3 / bf16
roundings are done in fp32 and integer arithmetic, because the interpreter's own casts truncate.
"""

from __future__ import annotations

import logging
import os

import torch

from miles_fp8.quant import BLOCK, quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: callers emulate
    triton = None
    tl = None

log = logging.getLogger(__name__)
DENSE = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 3}  # BLOCK_N: `dense_block_n`
# From this many rows `linear.fp8_mm` quantizes x in one fused pass first (`fp8_linear_quantized`)
# instead of once per column tile inside the GEMM; the same codes, so the same bits either way.
PREQ_ROWS = 512
# On CUDA where `preq_ok`, `fp8_linear` runs that pass at every M (inside the custom op, so a compiled
# decode step captures it): the GEMM's K loop then reads codes instead of quantizing x once per column
# tile, ~4x fewer instructions a weight in the sm_90 SASS (`bench/kernel_sass.py`: 31 -> 7.5 at BLOCK_N
# 32). False: quantize inside the GEMM below PREQ_ROWS rows (kept for timing, `fp8_rollout --dense-quant`).
DENSE_PREQ = True
# CUDA device index -> "fp8" / "fp8acc" / "fp16" / "bf16" (how the kernels multiply there, `_dot`) or
# "off", probed on first use (before any compiled or captured step: the engine runs an eager prefill
# first), so a compiled decode step reads a dict instead of the driver.
_modes: dict[int, str] = {}
_preq: dict[int, bool] = {}  # and whether the pre-quantized-x GEMM gives the same bits there


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_mode(device: torch.device) -> str:
    """``fp32`` (interpreter, CPU), ``fp8`` or ``bf16`` (products on this CUDA card), or ``off``."""
    if triton is None:
        return "off"
    if device.type != "cuda":
        return "fp32" if interpreted() else "off"
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _modes:
        _modes[i] = _probe(torch.device("cuda", i))
    return _modes[i]


def device_ok(device: torch.device) -> bool:
    """Whether the FP8 kernels run on ``device``: an e4m3 CUDA card (8.9+) where they compiled, or the CPU
    under Triton's interpreter."""
    return device_mode(device) != "off"


def available(x: torch.Tensor) -> bool:
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
    def _operand(q, MODE: tl.constexpr):
        """e4m3 codes as the dot's operand type: as they are (fp8), or exactly upcast to fp16 / bf16."""
        if MODE == "fp16":
            return q.to(tl.float16)
        elif MODE == "bf16":
            return q.to(tl.bfloat16)
        else:
            return q

    @triton.jit
    def _codes(a, MODE: tl.constexpr):
        """Loaded e4m3 codes (weights, or x from the fused quantization pass) as the dot's operand."""
        if MODE == "fp32":
            return a.to(tl.float32)
        else:
            return _operand(a, MODE)

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
        else:
            q = _operand(y.to(tl.float8e4nv), MODE)
        return q, scale

    @triton.jit
    def _dot(lhs, rhs, MODE: tl.constexpr):
        """lhs [R, BK] @ rhs [C, BK].T -> fp32 [R, C] for two operands in the dot's dtype (`_codes`,
        `_quant_rows`): exact products of e4m3 values, so exact block sums in the interpreter's float64.

        FP8: ``max_num_imprecise_acc=32`` adds each k32 wgmma's partial sum into an fp32 accumulator;
        0 makes Triton upcast e4m3 to fp16 mma.sync instead. ``fp8acc`` (opt-in, not probed by default)
        keeps each 128-column block in the tensor core's reduced-precision accumulator (a bare 64x64x128
        dot was 1.3e-4 off on an H100, 4.6e-5 with the k32 promotion): no FADDs and no wait between the
        k32 wgmmas, 20-35% fewer loop instructions in the sm_90 SASS (`bench/kernel_sass.py`)."""
        if MODE == "fp32":  # the interpreter: float64 sums of these products are exact, in any order
            return tl.dot(lhs.to(tl.float64), tl.trans(rhs.to(tl.float64))).to(tl.float32)
        elif MODE == "fp8":
            return tl.dot(lhs, tl.trans(rhs), max_num_imprecise_acc=32)
        elif MODE == "fp8acc":
            return tl.dot(lhs, tl.trans(rhs), max_num_imprecise_acc=128)  # the K block
        else:
            return tl.dot(lhs, tl.trans(rhs))

    @triton.jit
    def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
        """The fp32 accumulator: [BM, BN], or [BN, BM] for a SWAP tile (`_acc_add`)."""
        if SWAP:
            return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _acc_add(acc, aq, a_s, w, s, MODE: tl.constexpr, SWAP: tl.constexpr):
        """acc + the block's products of codes ``aq`` [BM, BK] and e4m3 weights ``w`` [BN, BK], scaled by
        row scale ``a_s`` [BM] times weight scale ``s`` [BN]. SWAP: the weight tile is the MMA's row
        operand (acc [BN, BM]), so a 16-row decode tile still runs 64-row wgmma on Hopper (below 64 rows
        Triton upcasts e4m3 to fp16 mma.sync); each product is the same, so is each exact block sum."""
        wq = _codes(w, MODE)
        if SWAP:
            return acc + _dot(wq, aq, MODE) * (s[:, None] * a_s[None, :])
        else:
            return acc + _dot(aq, wq, MODE) * (a_s[:, None] * s[None, :])

    @triton.jit
    def _acc_rows(acc, SWAP: tl.constexpr):
        """The accumulator as [BM, BN]."""
        if SWAP:
            return tl.trans(acc)
        else:
            return acc

    @triton.jit
    def _fp8_rows_kernel(
        a_ptr, as_ptr, w_ptr, s_ptr, bounds_ptr, out_ptr, rows, n_out, k_in, stride_a, n_chunks,
        GROUPED: tl.constexpr, PREQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, MODE: tl.constexpr, SWAP: tl.constexpr,
    ):  # fmt: skip
        """out [M, n_out] (row stride n_out) = fp8(a) @ dequant(W_e).T, W [E, n_out, k_in] e4m3 with scales
        [E, ceil(n_out/128), ceil(k_in/128)]. GROUPED: program (e, n tile, z) does expert e's rows
        ``bounds[e] .. bounds[e+1]-1``; else every one of ``rows`` rows with W = W_0. Row chunks of
        BLOCK_M go round-robin over the grid's third axis (one program a chunk for dense linears).
        PREQ: ``a`` holds x's e4m3 codes and ``as_ptr`` its scales [M, ceil(k_in/128)], from the fused
        quantization kernel (the same IEEE steps), so the products and the result are the same bits."""
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_out
        if GROUPED:
            start = tl.load(bounds_ptr + e)
            end = tl.load(bounds_ptr + e + 1)
        else:
            start = 0
            end = rows
        kb = tl.cdiv(k_in, BLOCK_K)
        e64 = e.to(tl.int64)
        w_off = e64 * n_out * k_in + n[:, None] * k_in
        s_off = e64 * tl.cdiv(n_out, BLOCK_K) * kb + (n // BLOCK_K) * kb
        kk = tl.arange(0, BLOCK_K)
        # Static loop bound, empty chunks skipped: a data-dependent bound would need a host sync.
        for c in range(0, n_chunks):
            m0 = start + (c * tl.num_programs(2) + tl.program_id(2)) * BLOCK_M
            if m0 < end:
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < end
                m64 = m.to(tl.int64)
                acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                for b in range(0, kb):
                    k = b * BLOCK_K + kk
                    k_ok = k < k_in
                    amask = m_ok[:, None] & k_ok[None, :]
                    a = tl.load(a_ptr + m64[:, None] * stride_a + k[None, :], mask=amask, other=0.0)
                    if PREQ:
                        a_s = tl.load(as_ptr + m64 * kb + b, mask=m_ok, other=1.0)
                        aq = _codes(a, MODE)
                    else:
                        aq, a_s = _quant_rows(a, MODE)
                    w = tl.load(w_ptr + w_off + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    s = tl.load(s_ptr + s_off + b, mask=n_ok, other=0.0)
                    acc = _acc_add(acc, aq, a_s, w, s, MODE, SWAP)
                dt = out_ptr.dtype.element_ty
                y = _rounded(_acc_rows(acc, SWAP), dt, MODE).to(dt)
                tl.store(out_ptr + m64[:, None] * n_out + n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def swapped(block_m: int) -> bool:
    """Whether tiles of ``block_m`` rows multiply transposed (`_acc_add`): below 64 rows, so FP8 runs on
    64-row wgmma with the weight as the row operand. Fixed by the row block, so a row block always gives
    the same instruction and the same bits."""
    return block_m < 64


def launch_config(cfg: dict) -> dict:
    """The tile constants of `cfg`; the interpreter takes no num_warps / num_stages."""
    if interpreted():
        return {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    return dict(cfg)


def launch_rows(
    a, w, s, bounds, out, rows: int, chunks: int, row_programs: int, cfg: dict, mode: str, a_scale=None
):
    """`_fp8_rows_kernel` over ``w``'s E experts (``bounds`` given) or one dense weight (``bounds`` None).

    :param cfg: BLOCK_M, BLOCK_N (and num_warps, num_stages); ``chunks``: the row-chunk loop bound of
        each program; ``row_programs``: the grid's third axis; ``a_scale``: ``a`` is already quantized
        (e4m3 codes) with these 1x128 scales.
    """
    # `quant.quantize` returns strided views for dims that are not a multiple of 128: the kernel indexes
    # the weight and its scales as dense arrays
    w, s = w.contiguous(), s.contiguous()
    a_scale = None if a_scale is None else a_scale.contiguous()
    assert a.stride(-1) == 1, "the kernel reads rows of a with unit column stride"
    n_out, k_in = w.shape[-2], w.shape[-1]
    experts = w.shape[0] if w.dim() == 3 else 1
    grid = (experts, triton.cdiv(n_out, cfg["BLOCK_N"]), row_programs)
    _fp8_rows_kernel[grid](
        a, s if a_scale is None else a_scale, w, s, s if bounds is None else bounds, out, rows, n_out, k_in,
        a.stride(0), chunks, GROUPED=bounds is not None, PREQ=a_scale is not None, BLOCK_K=BLOCK, MODE=mode,
        SWAP=swapped(cfg["BLOCK_M"]), **launch_config(cfg),
    )  # fmt: skip


def dense_block_n(n_out: int) -> int:
    """Column tile of the dense kernel: from N alone (never M), narrower for small N so a decode step
    still spreads the weight read over enough programs."""
    return 64 if n_out >= 4096 else 32


def _dense(x, weight, weight_scale, mode: str, dtype: torch.dtype, x_scale=None) -> torch.Tensor:
    m = x.shape[0]
    out = torch.empty(m, weight.shape[0], dtype=dtype, device=x.device)
    if m:
        cfg = dict(DENSE, BLOCK_N=dense_block_n(weight.shape[0]))
        rows = triton.cdiv(m, cfg["BLOCK_M"])
        launch_rows(x, weight, weight_scale, None, out, m, 1, rows, cfg, mode, x_scale)
    return out


@torch.library.custom_op("miles_fp8::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ dequant(weight).T`` with x quantized in 1x128 tiles (blockwise recipe): inside the kernel,
    or on CUDA where `preq_ok` (`DENSE_PREQ`) by the fused pass just before it, the same codes.

    :param x: bf16, fp16 or fp32 rows (the output has x's dtype).
    :param weight: e4m3 ``[N, K]``; ``weight_scale``: fp32 decode scales of its 128x128 blocks,
        ``[ceil(N/128), ceil(K/128)]`` (HF ``weight_scale_inv``).
    """
    mode = device_mode(x.device)
    if mode == "off":
        raise RuntimeError(f"fp8_linear cannot run on {x.device}: needs triton and an e4m3 card (8.9+)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if DENSE_PREQ and x.is_cuda and preq_ok(x.device):  # the same codes, so the same bits (probed)
        xq, xs = quantize(x, (1, BLOCK), fast=True)
        return _dense(xq, weight.contiguous(), weight_scale.contiguous(), mode, x.dtype, xs)
    return _dense(x, weight.contiguous(), weight_scale.contiguous(), mode, x.dtype)


@fp8_linear.register_fake
def _(x, weight, weight_scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("miles_fp8::fp8_linear_quantized", mutates_args=())
def fp8_linear_quantized(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    """`fp8_linear` on x already quantized in 1x128 tiles (``quant.quantize(x, (1, 128))``: e4m3 ``xq``
    [M, K], fp32 ``x_scale`` [M, ceil(K/128)]): the same tiles and products, so the same bits, without the
    in-kernel quantization (worth it for large M, and free when the caller keeps the codes anyway)."""
    mode = device_mode(xq.device)
    if mode == "off":
        raise RuntimeError(f"fp8_linear cannot run on {xq.device}: needs triton and an e4m3 card (8.9+)")
    xq = xq.contiguous()
    return _dense(xq, weight.contiguous(), weight_scale.contiguous(), mode, dtype, x_scale.contiguous())


@fp8_linear_quantized.register_fake
def _(xq, x_scale, weight, weight_scale, dtype):
    return xq.new_empty(xq.shape[0], weight.shape[0], dtype=dtype)


def _probe(device: torch.device) -> str:
    """How the kernels multiply on this card: FP8 products, else the same products on e4m3 codes upcast
    exactly to fp16 (one conversion instruction), else to bf16 (`probe_error` < 1e-3 each), else off;
    and whether the pre-quantized GEMM gives the in-kernel bits (`probe_preq`)."""
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        raise RuntimeError(
            "the FP8 Triton kernels were first used inside a CUDA graph capture or torch.compile trace; "
            "run one eager forward (as the engine's prefill does) before capturing."
        )
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "off"
    why = ""
    for mode in ("fp8", "fp16", "bf16"):
        try:
            err = probe_error(device, mode)
            if not err < 1e-3:
                raise ValueError(f"relative error {err:.2e} against the emulation")
            if mode != "fp8":
                log.warning("FP8 tensor-core dot unusable here (%s); FP8 kernels multiply in %s", why, mode)
            _preq[device.index] = probe_preq(device, mode)
            return mode
        except Exception as e:  # this Triton / card cannot compile or run that dot
            why = f"{mode}: {e}"
    log.warning("FP8 Triton kernels off on %s (%s); FP8 layers emulate", device, why)
    return "off"


def _probe_data(device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(70, 320, device=device, generator=g).pow(3)
    x[3] = 0
    return x, *quantize(torch.randn(96, 320, device=device, generator=g), (BLOCK, BLOCK))


def probe_error(device: torch.device, mode: str) -> float:
    """Largest relative error against the emulation of every kernel and tile shape in use (the dense
    GEMM with 64 and 16 rows, 32 and 64 columns; both expert kernels at both row blocks) in ``mode``."""
    from miles_fp8 import triton_experts
    from miles_fp8.quant import dequantize, quantize_dequantize

    x, wq, ws = _probe_data(device)
    ref = quantize_dequantize(x, (1, BLOCK)) @ dequantize(wq, ws, (BLOCK, BLOCK)).t()
    err = triton_experts.probe_error(x, mode)
    for block_m in (DENSE["BLOCK_M"], 16):
        for block_n in (32, 64):
            cfg = dict(DENSE, BLOCK_M=block_m, BLOCK_N=block_n)
            out = torch.empty(70, 96, device=device)
            launch_rows(x, wq, ws, None, out, 70, 1, triton.cdiv(70, block_m), cfg, mode)
            err = max(err, float((out - ref).norm() / ref.norm()))
    return err


def probe_preq(device: torch.device, mode: str) -> bool:
    """Whether the GEMM and the expert kernels on codes from the fused quantization pass give the
    in-kernel path's bits here."""
    from miles_fp8 import triton_experts

    x, wq, ws = _probe_data(device)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            xd = x.to(dtype)
            xq, xs = quantize(xd, (1, BLOCK), fast=True)
            inner = _dense(xd, wq, ws, mode, dtype)
            if not torch.equal(_dense(xq, wq, ws, mode, dtype, xs), inner):
                raise ValueError(f"{dtype} results differ from quantizing inside the GEMM")
            if not triton_experts.preq_matches(xd, mode):
                raise ValueError(f"{dtype} expert results differ from quantizing inside the kernels")
    except Exception as e:  # keep the in-kernel quantization everywhere: rows stay independent of M
        log.warning("FP8 GEMM on pre-quantized x off (%s)", e)
        return False
    return True


def force_mode(device: torch.device, mode: str) -> bool:
    """Make the kernels on CUDA ``device`` multiply in ``mode`` without the probe (benches time each mode);
    whether the pre-quantized paths give the in-kernel bits is still probed, in that mode. Returns it."""
    _modes[device.index] = mode
    _preq[device.index] = probe_preq(device, mode)
    return _preq[device.index]


def preq_ok(device: torch.device) -> bool:
    """Whether `fp8_linear_quantized` gives `fp8_linear`'s bits on ``device`` (probed with the mode; the
    interpreter: always)."""
    if device.type != "cuda":
        return True
    device_mode(device)
    return _preq.get(device.index if device.index is not None else torch.cuda.current_device(), False)
