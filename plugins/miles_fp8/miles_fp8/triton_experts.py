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
2. down: `miles_fp8.triton_fp8`'s blockwise GEMM over each expert's rows of the SwiGLU activations (the
   kernel the dense `Fp8Linear` runs over all rows). The gate and up outputs, silu(gate), their product
   and the output are rounded to x's dtype as the per-expert loop rounds them, so in bf16 the kernels give
   the loop's numbers up to the order of the fp32 sums (bit for bit under the interpreter).

A row's result depends on its tile height (the tensor-core instruction differs), which is chosen from the
token count against a power of two (`block_m`): a decode batch and the power-of-two padded batch that a
CUDA graph runs it in always get the same tiles, so captured and eager decoding agree bit for bit. How
the products run (FP8 tensor cores, bf16 fallback, off) is probed once per card by `triton_fp8`.
"""

from __future__ import annotations

import torch

from miles_core.api import expert_row_block
from miles_fp8 import triton_fp8
from miles_fp8.quant import quantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the per-expert loop serves
    triton = None
    tl = None

DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64  # rows of one expert per tile
GATE_UP = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
DOWN = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
# The down kernel's tile for transposed (decode) row blocks: 128 weight rows as two 64-row wgmmas, 26%
# fewer K-loop instructions a weight than 64 in the sm_90 SASS (2.92 -> 2.17 on FP8 codes, no spills;
# `bench/kernel_sass.py`); the 64-row prefill tile spills at 128. Chosen by the row block alone.
DOWN_SWAPPED = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3}
# Off on CUDA only as an escape hatch; the GPU tests check captured == eager greedy tokens with it on.
ENABLED_ON_CUDA = True


def device_ok(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: `triton_fp8.device_ok` (an e4m3 card where the kernels
    compiled, or the CPU under Triton's interpreter), on CUDA while `ENABLED_ON_CUDA`."""
    if triton is None or (device.type == "cuda" and not ENABLED_ON_CUDA):
        return False
    return triton_fp8.device_ok(device)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device (see `device_ok`)."""
    return device_ok(x.device)


def block_m(tokens: int, copies: int, num_experts: int) -> int:
    """Rows per expert tile (`miles_core.api.expert_row_block` with this module's row blocks)."""
    return expert_row_block(tokens, copies, num_experts, DECODE_BLOCK_M, PREFILL_BLOCK_M)


if triton is not None:
    from miles_fp8.triton_fp8 import (  # noqa: F401  (the kernels' globals)
        _acc_add,
        _acc_rows,
        _acc_zeros,
        _codes,
        _quant_rows,
        _rounded,
    )

    @triton.jit
    def _fp8_gate_up_kernel(
        x_ptr, xs_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, src_ptr, bounds_ptr, out_ptr, g_ptr, u_ptr, hidden,
        inter, stride_x, stride_s, n_chunks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, MODE: tl.constexpr, SAVE: tl.constexpr, SWAP: tl.constexpr, PREQ: tl.constexpr,
    ):  # fmt: skip
        # SAVE (training): also store the rounded gate and up outputs for the SwiGLU backward (rows of
        # stride_s: the two halves of one [M, 2I] buffer, as the core's `swiglu_backward` reads them).
        # PREQ: x holds the tokens' e4m3 codes and xs_ptr their 1x128 scales [N, H/128] (one fused pass
        # over the tokens, not once per copy and column tile here): the same codes, the same bits.
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
                m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # copies * row width may pass 2^31
                m_ok = m < end
                src = tl.load(src_ptr + m, mask=m_ok, other=0).to(tl.int64)
                acc_g = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                acc_u = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                for b in range(0, kb):
                    k = b * BLOCK_K + kk
                    k_ok = k < hidden
                    xmask = m_ok[:, None] & k_ok[None, :]
                    xt = tl.load(x_ptr + src[:, None] * stride_x + k[None, :], mask=xmask, other=0.0)
                    if PREQ:
                        xq = _codes(xt, MODE)
                        xs = tl.load(xs_ptr + src.to(tl.int64) * kb + b, mask=m_ok, other=1.0)
                    else:
                        xq, xs = _quant_rows(xt, MODE)
                    wmask = n_ok[:, None] & k_ok[None, :]
                    wg = tl.load(wg_ptr + w_off + k[None, :], mask=wmask, other=0.0)
                    wu = tl.load(wu_ptr + w_off + k[None, :], mask=wmask, other=0.0)
                    sg = tl.load(sg_ptr + s_off + b, mask=n_ok, other=0.0)
                    su = tl.load(su_ptr + s_off + b, mask=n_ok, other=0.0)
                    acc_g = _acc_add(acc_g, xq, xs, wg, sg, MODE, SWAP)
                    acc_u = _acc_add(acc_u, xq, xs, wu, su, MODE, SWAP)
                # SwiGLU rounded as the per-expert loop and the trainer round it: gate and up outputs
                # to x's dtype, silu(gate) to x's dtype, then the product (a no-op for fp32).
                dt = out_ptr.dtype.element_ty
                g = _rounded(_acc_rows(acc_g, SWAP), dt, MODE)
                u = _rounded(_acc_rows(acc_u, SWAP), dt, MODE)
                act = _rounded(_rounded(g * tl.sigmoid(g), dt, MODE) * u, dt, MODE)
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(out_ptr + m[:, None] * inter + n[None, :], act.to(dt), mask=omask)
                if SAVE:
                    tl.store(g_ptr + m[:, None] * stride_s + n[None, :], g.to(dt), mask=omask)
                    tl.store(u_ptr + m[:, None] * stride_s + n[None, :], u.to(dt), mask=omask)


def _run(x, src, bounds, weights, act, out, mode: str, preq: bool, saved: tuple | None = None) -> None:
    gate, up, down, gate_s, up_s, down_s = weights
    num_experts, inter, hidden = gate.shape
    m = src.numel()
    bm = block_m(x.shape[0], m, num_experts)
    chunks = triton.cdiv(m, bm)  # enough for an expert that got every copy
    c1 = triton_fp8.launch_config(GATE_UP)
    grid1 = (num_experts, triton.cdiv(inter, c1["BLOCK_N"]))
    # Where `preq_ok` holds (probed on this card: the fused quantization pass gives the in-kernel codes),
    # the tokens and then the SwiGLU output are quantized once each in that pass, instead of once per
    # copy and column tile inside the kernels (each token ~k x 12 times in gate/up, each copy's
    # activation 32 times in down at hidden 2048): the same codes, so the same bits.
    xq, xs = quantize(x, (1, triton_fp8.BLOCK), fast=True) if preq else (x, x)
    _fp8_gate_up_kernel[grid1](
        xq, xs, gate, up, gate_s, up_s, src, bounds, act, *(saved or (act, act)), hidden, inter,
        xq.stride(0), saved[0].stride(0) if saved else inter, chunks, BLOCK_M=bm, BLOCK_K=triton_fp8.BLOCK,
        MODE=mode, SAVE=saved is not None, SWAP=triton_fp8.swapped(bm), PREQ=preq, **c1,
    )  # fmt: skip
    down_cfg = dict(DOWN_SWAPPED if triton_fp8.swapped(bm) else DOWN, BLOCK_M=bm)
    if preq:
        act_q, act_s = quantize(act, (1, triton_fp8.BLOCK), fast=True)
        triton_fp8.launch_rows(act_q, down, down_s, bounds, out, m, chunks, 1, down_cfg, mode, act_s)
    else:
        triton_fp8.launch_rows(act, down, down_s, bounds, out, m, chunks, 1, down_cfg, mode)


def _mode_for(x: torch.Tensor) -> str:
    mode = triton_fp8.device_mode(x.device) if triton is not None else "off"
    if mode == "off":
        raise RuntimeError(f"fp8_experts cannot run on {x.device}: needs triton and an e4m3 card (8.9+)")
    return mode


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
    return fp8_experts_saving(x, src, bounds, gate, up, down, gate_scale, up_scale, down_scale, False)[0]


def fp8_experts_saving(x, src, bounds, gate, up, down, gate_scale, up_scale, down_scale, save: bool):
    """`fp8_experts`, returning ``(out, act, h)``: with ``save`` also the SwiGLU output ``act`` [M, I] (the
    down projection's input) and ``h`` = [gate | up] [M, 2I], the rounded gate and up outputs side by side,
    which the training backward needs (else None)."""
    mode = _mode_for(x)
    x = x.contiguous()
    weights = tuple(t.contiguous() for t in (gate, up, down, gate_scale, up_scale, down_scale))
    m, hidden, inter = src.numel(), x.shape[1], gate.shape[1]
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    h = torch.empty(m, 2 * inter, dtype=x.dtype, device=x.device) if save else None
    if m:
        saved = (h[:, :inter], h[:, inter:]) if save else None
        _run(x, src, bounds, weights, act, out, mode, triton_fp8.preq_ok(x.device), saved)
    return (out, act, h) if save else (out, None, None)


@fp8_experts.register_fake
def _(x, src, bounds, gate, up, down, gate_scale, up_scale, down_scale):
    return x.new_empty(src.shape[0], x.shape[1])


def _probe_cases(x: torch.Tensor, seed: int):
    """The probes' inputs: random blockwise weights of two experts (FFN 96) over ``x`` [N >= 16, H], then
    ``(xt, src, cut, bounds, weights, codes)`` for 8 tokens sent to both experts (the decode tile) and for
    every token sent to one of them (the prefill tile, given enough rows); ``codes``: the (q, scale) pairs."""
    dev, hidden, tile = x.device, x.shape[1], (triton_fp8.BLOCK, triton_fp8.BLOCK)
    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = ((2, 96, hidden), (2, 96, hidden), (2, hidden, 96))
    codes = [quantize(torch.randn(s, device=dev, generator=g), tile) for s in shapes]
    weights = tuple(q.contiguous() for q, _ in codes) + tuple(s for _, s in codes)
    for tokens, k in ((8, 2), (x.shape[0], 1)):
        src = torch.arange(tokens, device=dev).repeat(k).to(torch.int32)
        cut = (0, tokens, 2 * tokens) if k == 2 else (0, tokens // 2, tokens)
        bounds = torch.tensor(cut, dtype=torch.int32, device=dev)
        yield x[:tokens], src, cut, bounds, weights, codes


def probe_error(x: torch.Tensor, mode: str) -> float:
    """Largest relative error of both expert kernels' products in ``mode`` against the emulation, with the
    decode and the prefill row block, on two experts over the fp32 rows ``x`` [N >= 16, H]: `triton_fp8`'s
    per-card probe runs it, so the mode it picks compiles for every kernel in use.

    Each stage is checked on its own inputs: the gate / up outputs and the SwiGLU product against the
    emulation on x, the down kernel's output against the emulation on the gate/up kernel's own SwiGLU
    output. Chaining the emulation through both kernels would instead measure how often a last-bit
    difference in the SwiGLU output flips one of its e4m3 roundings (a 2^-3 step each), which any two
    correct ways of summing produce."""
    import torch.nn.functional as F

    from miles_fp8.quant import dequantize, quantize_dequantize

    tile, err = (triton_fp8.BLOCK, triton_fp8.BLOCK), 0.0
    for xt, src, cut, bounds, weights, codes in _probe_cases(x, seed=1):
        decode = src.numel() > xt.shape[0]  # the 8 tokens sent to both experts
        assert block_m(xt.shape[0], src.numel(), 2) == (DECODE_BLOCK_M if decode else PREFILL_BLOCK_M)
        deq = [dequantize(q, s, tile) for q, s in codes]
        out = torch.empty(src.numel(), x.shape[1], device=x.device)
        act = torch.empty(src.numel(), 96, device=x.device)
        saved = (torch.empty_like(act), torch.empty_like(act))
        _run(xt, src, bounds, weights, act, out, mode, False, saved)
        refs = [torch.empty_like(t) for t in (*saved, act, out)]
        for e in range(2):
            rows = slice(cut[e], cut[e + 1])
            xe = quantize_dequantize(xt[src[rows].long()], (1, tile[1]))
            refs[0][rows], refs[1][rows] = xe @ deq[0][e].t(), xe @ deq[1][e].t()
            refs[2][rows] = F.silu(refs[0][rows]) * refs[1][rows]
            refs[3][rows] = quantize_dequantize(act[rows], (1, tile[1])) @ deq[2][e].t()
        for got, ref in zip((*saved, act, out), refs):
            err = max(err, float((got - ref).norm() / ref.norm()))
    return err


def preq_matches(x: torch.Tensor, mode: str) -> bool:
    """Whether both kernels on tokens and activations quantized in the fused pass give the bits of
    quantizing inside them, for the decode and the prefill row block, on rows ``x`` [N >= 16, H] in
    ``mode`` (`triton_fp8.probe_preq` asks, once per card)."""
    for xt, src, _, bounds, weights, _ in _probe_cases(x, seed=2):
        outs = []
        for preq in (False, True):
            out = torch.empty(src.numel(), x.shape[1], device=x.device, dtype=x.dtype)
            act = torch.empty(src.numel(), 96, device=x.device, dtype=x.dtype)
            _run(xt, src, bounds, weights, act, out, mode, preq)
            outs.append(out)
        if not torch.equal(*outs):
            return False
    return True
