"""Grouped W4A16 expert kernels (Triton): every routed expert of an MoE layer in two launches, no host sync.

`Int4Experts` calls `int4_experts` on CUDA (and under Triton's interpreter in the CPU tests) instead of its
per-expert loop, which reads the expert counts back to the host. The dispatch is the core's (`expert_order`,
`expert_bounds`): copies sorted by expert, each expert's range in a device tensor. Two kernels, each over a
static grid of (expert, output tile), so a CUDA graph captures them:

1. gate/up + SwiGLU: the expert's rows of x are read straight from the token rows; each packed int32 of
   the gate and up tiles is unpacked in registers (value ``i`` of eight at bits ``4i``, stored as ``q + 8``)
   into exact small integers, multiplied with x (fp32 accumulate), and the partial sum of each K tile is
   scaled by its group's scale, so ``sum_k x_k * q_k * s_g`` is computed without rounding ``q * s``;
2. down: the same over the activations (the gate and up outputs, silu(gate) and the SwiGLU product are
   rounded to x's dtype, as the per-expert loop and the trainer round them).

The weights stay in the compressed-tensors layout the plugin already stores (int32 ``[E, N, K/8]``, bf16
scales ``[E, N, K/g]``), so weight sync, export and the CPU emulation are unchanged. A K tile never
straddles two groups: the group size must be a multiple of 16 (`usable`).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the per-expert loop serves
    triton = None
    tl = None

PACK = 8
# Rows of one expert per tile: decode routes a few rows to each expert; prefill many.
DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64
GATE_UP = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
DOWN = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def usable(group_size: int) -> bool:
    """Whether the kernels take this group size (K tiles of 16+ columns inside one group)."""
    return triton is not None and group_size % 16 == 0


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device (CUDA, or Triton's interpreter on CPU)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _block_k(group_size: int) -> int:
    return next(b for b in (64, 32, 16) if group_size % b == 0)


if triton is not None:

    @triton.jit
    def _unpack(p_ptrs, mask, shift):
        """``[BN, BK/8]`` packed int32s -> ``[BN, BK]`` signed int4 values (exact small int32s). Each
        int32 is loaded once and repeated eight times in registers (three interleaves), then each copy
        shifted to its own nibble."""
        p = tl.load(p_ptrs, mask=mask, other=0)
        p = tl.interleave(p, p)
        p = tl.interleave(p, p)
        p = tl.interleave(p, p)
        return ((p >> shift) & 0xF) - 8

    @triton.jit
    def _rounded(x, dt, INTERP: tl.constexpr):
        """fp32 ``x`` rounded to dtype ``dt`` (nearest even), kept in fp32. The interpreter's own casts
        to bf16 truncate, so there bf16 is rounded in integer arithmetic first (then the cast is exact)."""
        if INTERP:
            if dt == tl.bfloat16:
                bits = x.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)

    @triton.jit
    def _dot(a, q, PREC: tl.constexpr, INTERP: tl.constexpr):
        """a [BM, BK] (x's dtype) times q [BN, BK] (int4 values as int32) -> fp32 [BM, BN], exact
        products. The interpreter's bf16 dot and int-to-bf16 cast are wrong (Triton 3.7), so there
        both operands go to fp32 (exact) and multiply in IEEE fp32."""
        if INTERP:
            return tl.dot(a.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        return tl.dot(a, tl.trans(q.to(tl.float32).to(a.dtype)), input_precision=PREC)

    @triton.jit
    def _int4_gate_up_kernel(
        x_ptr, p_ptr, s_ptr, src_ptr, bounds_ptr, out_ptr, hidden, inter, stride_x, n_chunks,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        kp, ng = hidden // 8, hidden // GROUP
        e64 = e.to(tl.int64)
        p_gate = p_ptr + e64 * (2 * inter * kp) + n[:, None] * kp  # rows [0, inter): gate
        p_up = p_gate + inter * kp  # rows [inter, 2 inter): up
        s_gate = s_ptr + e64 * (2 * inter * ng) + n * ng
        s_up = s_gate + inter * ng
        kk = tl.arange(0, BLOCK_K)
        shift = ((kk % 8) * 4)[None, :]
        kp8 = tl.arange(0, BLOCK_K // 8)[None, :]  # the packed columns of one K tile
        # Static loop bound (enough chunks for an expert that got every copy), empty chunks skipped: a
        # data-dependent bound would need the expert's row count on the host.
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < end
                src = tl.load(src_ptr + m, mask=m_ok, other=0)
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, hidden, BLOCK_K):
                    k = k0 + kk  # hidden is a multiple of GROUP, GROUP of BLOCK_K: always in range
                    xt = tl.load(x_ptr + src[:, None] * stride_x + k[None, :], mask=m_ok[:, None], other=0.0)
                    col = k0 // 8 + kp8
                    qg = _unpack(p_gate + col, n_ok[:, None], shift)
                    qu = _unpack(p_up + col, n_ok[:, None], shift)
                    sg = tl.load(s_gate + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    su = tl.load(s_up + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc_g += _dot(xt, qg, PREC, INTERP) * sg[None, :]
                    acc_u += _dot(xt, qu, PREC, INTERP) * su[None, :]
                # SwiGLU rounded as the per-expert loop and the trainer round it: gate and up outputs
                # to x's dtype, silu(gate) to x's dtype, then the product (a no-op for fp32).
                dt = out_ptr.dtype.element_ty
                g = _rounded(acc_g, dt, INTERP)
                u = _rounded(acc_u, dt, INTERP)
                act = _rounded(_rounded(g * tl.sigmoid(g), dt, INTERP) * u, dt, INTERP)
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(out_ptr + m[:, None] * inter + n[None, :], act.to(dt), mask=omask)

    @triton.jit
    def _int4_down_kernel(
        a_ptr, p_ptr, s_ptr, bounds_ptr, out_ptr, hidden, inter, n_chunks,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr, INTERP: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        kp, ng = inter // 8, inter // GROUP
        e64 = e.to(tl.int64)
        p_w = p_ptr + e64 * (hidden * kp) + n[:, None] * kp
        s_w = s_ptr + e64 * (hidden * ng) + n * ng
        kk = tl.arange(0, BLOCK_K)
        shift = ((kk % 8) * 4)[None, :]
        kp8 = tl.arange(0, BLOCK_K // 8)[None, :]
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, inter, BLOCK_K):
                    k = k0 + kk
                    a = tl.load(a_ptr + m[:, None] * inter + k[None, :], mask=m_ok[:, None], other=0.0)
                    q = _unpack(p_w + k0 // 8 + kp8, n_ok[:, None], shift)
                    s = tl.load(s_w + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc += _dot(a, q, PREC, INTERP) * s[None, :]
                omask = m_ok[:, None] & n_ok[None, :]
                dt = out_ptr.dtype.element_ty
                y = _rounded(acc, dt, INTERP).to(dt)
                tl.store(out_ptr + m[:, None] * hidden + n[None, :], y, mask=omask)


def _launch_config(cfg: dict) -> dict:
    """The kernel arguments of a config; pipelining settings only where they mean something (CUDA)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"BLOCK_N": cfg["BLOCK_N"]}
    return dict(cfg)


# A custom op: a compiled decode step calls the two launches as one opaque op, and CUDA-graph capture
# records them like any other kernel.
@torch.library.custom_op("miles_int4qat::int4_experts", mutates_args=())
def int4_experts(
    x: torch.Tensor, src: torch.Tensor, bounds: torch.Tensor, gate_up_packed: torch.Tensor,
    gate_up_scale: torch.Tensor, down_packed: torch.Tensor, down_scale: torch.Tensor, group_size: int,
) -> torch.Tensor:  # fmt: skip
    """Expert outputs for the token copies in expert-sorted order.

    :param x: ``[N, H]`` token rows, bf16/fp16 (fp32 too: exact fp32 dot products).
    :param src: int32 ``[M]``: the token row of each sorted copy (``order // k``).
    :param bounds: int32 ``[E + 1]`` (`expert_bounds`): expert e owns sorted copies
        ``bounds[e] .. bounds[e+1]-1``.
    :param gate_up_packed: int32 ``[E, 2I, H/8]`` (rows ``[:I]`` gate, ``[I:]`` up), ``gate_up_scale``
        ``[E, 2I, H/g]``; ``down_packed`` int32 ``[E, H, I/8]``, ``down_scale`` ``[E, H, I/g]``.
    :returns: ``[M, H]`` in x's dtype: ``down_e(silu(gate_e(x)) * up_e(x))`` per copy.
    """
    if triton is None:
        raise RuntimeError("int4_experts needs triton (pip install triton)")
    if not usable(group_size):
        raise ValueError(f"the grouped INT4 kernel needs a group size divisible by 16, got {group_size}")
    x = x.contiguous()
    num_experts, two_i, _ = gate_up_packed.shape
    hidden, inter = x.shape[1], two_i // 2
    m = src.numel()
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_m = DECODE_BLOCK_M if m <= DECODE_BLOCK_M * num_experts else PREFILL_BLOCK_M
    chunks = triton.cdiv(m, block_m)  # enough for an expert that got every copy
    common = dict(
        GROUP=group_size, BLOCK_M=block_m, BLOCK_K=_block_k(group_size),
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        INTERP=os.environ.get("TRITON_INTERPRET") == "1",
    )  # fmt: skip
    c1, c2 = _launch_config(GATE_UP), _launch_config(DOWN)
    grid1 = (num_experts, triton.cdiv(inter, c1["BLOCK_N"]))
    _int4_gate_up_kernel[grid1](
        x, gate_up_packed.contiguous(), gate_up_scale.contiguous(), src, bounds, act, hidden, inter,
        x.stride(0), chunks, **common, **c1,
    )  # fmt: skip
    grid2 = (num_experts, triton.cdiv(hidden, c2["BLOCK_N"]))
    _int4_down_kernel[grid2](
        act, down_packed.contiguous(), down_scale.contiguous(), bounds, out, hidden, inter, chunks,
        **common, **c2,
    )  # fmt: skip
    return out


@int4_experts.register_fake
def _(x, src, bounds, gate_up_packed, gate_up_scale, down_packed, down_scale, group_size):
    return x.new_empty(src.shape[0], x.shape[1])
