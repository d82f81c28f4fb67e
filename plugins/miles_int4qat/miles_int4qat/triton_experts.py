"""Grouped W4A16 expert kernels (Triton): every routed expert of an MoE layer in two launches, no host sync.

`Int4Experts` calls `int4_experts` on CUDA (and under Triton's interpreter in the CPU tests) instead of its
per-expert loop, which reads the expert counts back to the host. The dispatch is the core's (`expert_order`,
`expert_bounds`): copies sorted by expert, each expert's range in a device tensor. Two kernels, each over a
static grid of (expert, output tile), so a CUDA graph captures them:

1. gate/up + SwiGLU: the expert's rows of x are read straight from the token rows; the gate and up tiles
   are dequantized in registers (`_dequant`) into exact small integers in x's 16-bit type, multiplied
   with x (fp32 accumulate), and the partial sum of each K tile is scaled by its group's scale, so
   ``sum_k x_k * q_k * s_g`` is computed without rounding ``q * s``;
2. down: the same over the activations (the gate and up outputs, silu(gate) and the SwiGLU product are
   rounded to x's dtype, as the per-expert loop and the trainer round them).

Dequantization is a few integer instructions per pair of weights and no int-to-float conversion: one
shift and one AND-OR put two nibbles ``u = q + 8`` into the low mantissa bits of a bf16 pair with
exponent 2^7 (fp16: 2^10), which reads as ``128 + u`` (``1024 + u``); one packed subtraction of 136
(1032) leaves ``q`` exactly. The two nibbles of a pair are ``i`` and ``i + 4`` of an int32, so each K tile
is multiplied in a permuted column order (`_kcols`), the same for x's columns and the weights, inside one
scale group: the sum is the same, only its fp32 order differs. The order is also chosen so that each
thread of Hopper's and Ampere's MMA fragments holds whole int32s (constant shifts, each word loaded once).

Tiles multiply transposed (`swapped`): the weight tile is the MMA's 64-row operand, straight from
registers, and the tokens its columns, so a 16-row decode tile runs Hopper's wgmma (not mma.sync) and no
tile stores its dequantized weights to shared memory. The row block is chosen from the token count
(`block_m`), so a decode batch and its CUDA-graph padding get the same instruction and the same bits.

The weights stay in the compressed-tensors layout the plugin already stores (int32 ``[E, N, K/8]``, bf16
scales ``[E, N, K/g]``), so weight sync, export and the CPU emulation are unchanged. A K tile (16 to 128
columns) never straddles two groups: the group size must be a multiple of 16 (`usable`).
"""

from __future__ import annotations

import os

import torch

from miles_core.api import expert_row_block

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the per-expert loop serves
    triton = None
    tl = None

PACK = 8
# Rows of one expert per tile: decode routes a few rows to each expert; prefill many.
DECODE_BLOCK_M, PREFILL_BLOCK_M = 16, 64
# Tiles of up to this many rows multiply transposed (`swapped`): the weight tile is the MMA's row operand,
# dequantized straight into its registers; otherwise it goes through shared memory as the column operand.
# Transposed, Hopper's sm_90 code takes about half the instructions a weight (inner loops as Triton 3.7
# compiles them, 64x64 weight tiles, gate/up-down: 3.6-4.8 at 16 rows, 5.1-6.9 at 64; 12-13 at 64 rows
# not transposed).
SWAP_MAX_BLOCK_M = 64
# BLOCK_N >= 64: a transposed tile's weight rows are the MMA's 64-row operand. BLOCK_K: the largest K tile
# (`block_k`; 128 takes ~20% fewer instructions a weight than 64 in those loops, with no register spills).
GATE_UP = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
DOWN = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
# The 16-bit float read from the bits ``MAGIC | u`` (u < 16 in the low mantissa bits) is ``OFFSET + u``:
# exponent 2^7 with bf16's 7-bit mantissa, 2^10 with fp16's 10-bit one. The kernels hold two at a time.
MAGIC = {torch.bfloat16: (0x4300, 136.0), torch.float16: (0x6400, 1032.0)}


def usable(group_size: int) -> bool:
    """Whether the kernels take this group size (K tiles of 16+ columns inside one group)."""
    return triton is not None and group_size % 16 == 0


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device (CUDA, or Triton's interpreter on CPU)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def block_k(group_size: int, cap: int) -> int:
    """K tile: the largest of 128, 64, 32, 16 that is at most ``cap`` and divides the group."""
    return next(b for b in (128, 64, 32, 16) if b <= max(cap, 16) and group_size % b == 0)


def block_m(tokens: int, copies: int, num_experts: int) -> int:
    """Rows per expert tile (`miles_core.api.expert_row_block` with this module's row blocks)."""
    return expert_row_block(tokens, copies, num_experts, DECODE_BLOCK_M, PREFILL_BLOCK_M)


def swapped(block_m: int) -> bool:
    """Whether tiles of ``block_m`` rows multiply transposed (`_acc_add`): up to SWAP_MAX_BLOCK_M rows.
    Fixed by the row block, so a row block always gives the same instruction and the same bits."""
    return block_m <= SWAP_MAX_BLOCK_M


if triton is not None:

    @triton.jit
    def _kcols(BLOCK_K: tl.constexpr):
        """Column c of a K tile multiplies k = _kcols[c]: c = 16b + 8s + 2t + h takes nibble
        ``i + 4h`` of packed word w, i = 2(b % 2) + s, w = t * BLOCK_K/32 + b // 2, so the pair (2t, 2t+1)
        that MMA fragments give lane t is one word's nibbles (i, i + 4), and lane t's words are its own.
        For 16-column tiles: c = 8w + 2i + h."""
        c = tl.arange(0, BLOCK_K)
        if BLOCK_K % 32 == 0:
            b = c // 16
            w = ((c // 2) % 4) * (BLOCK_K // 32) + b // 2
            return 8 * w + 2 * (b % 2) + (c // 8) % 2 + 4 * (c % 2)
        else:
            return (c // 8) * 8 + (c % 8) // 2 + 4 * (c % 2)

    @triton.jit
    def _dequant(p, magic, dt, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
        """Packed int32 ``[BN, BK/8]`` -> ``[BN, BK]`` int4 values q (exact) in the dot's type, columns in
        `_kcols` order. ``magic``: `MAGIC`'s bits twice (``m | m << 16``), a runtime value so that the AND
        and the OR fuse into one LOP3. Per word: shifts by 0, 4, 8, 12, each masked to nibbles (i, i+4)
        and OR-ed with the magic -> two 16-bit floats ``OFFSET + u``; one packed subtraction -> q."""
        shift = (tl.arange(0, 4) * 4)[None, None, :]
        t = ((p[:, :, None] >> shift) & 0x000F000F) | magic  # [BN, BK/8, 4]: nibbles i (low), i+4 (high)
        pair = tl.join(t.to(tl.int16), (t >> 16).to(tl.int16))  # [BN, BK/8, 4, 2]
        if dt == tl.float16:
            w = pair.to(tl.float16, bitcast=True)
            off: tl.constexpr = 1032.0
        else:
            w = pair.to(tl.bfloat16, bitcast=True)
            off: tl.constexpr = 136.0
        # The interpreter's bf16 arithmetic is wrong (Triton 3.7): there, and for fp32 x, subtract in fp32
        # (exact either way).
        if INTERP or dt == tl.float32:
            w = w.to(tl.float32) - off
        else:
            w = w - off
        if BLOCK_K % 32 == 0:  # [BN, w=(t, bh), i=(bl, s), h] -> [BN, bh, bl, s, t, h]
            w = tl.permute(tl.reshape(w, (BLOCK_N, 4, BLOCK_K // 32, 2, 2, 2)), (0, 2, 3, 4, 1, 5))
        return tl.reshape(w, (BLOCK_N, BLOCK_K))

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
    def _acc_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
        """The fp32 accumulator: [BM, BN], or [BN, BM] for a SWAP tile (`_acc_add`)."""
        if SWAP:
            return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _load_rows(ptrs, kc, SWAP: tl.constexpr):
        """Activation tile of row pointers ``ptrs`` [BM] at columns ``kc`` [BK]: [BM, BK], or [BK, BM] for
        a SWAP tile (the MMA's column operand as it is stored: a few instructions fewer than a transpose)."""
        if SWAP:
            return tl.load(ptrs[None, :] + kc[:, None])
        else:
            return tl.load(ptrs[:, None] + kc[None, :])

    @triton.jit
    def _acc_add(acc, a, w, s, PREC: tl.constexpr, INTERP: tl.constexpr, SWAP: tl.constexpr):
        """acc + (a @ w [BN, BK].T) * s [BN]: exact products, fp32 sums, the group scale on the tile's
        partial sum. a: [BM, BK] (`_load_rows`); SWAP: a is [BK, BM] and w the MMA's row operand (acc
        [BN, BM]). The interpreter's bf16 dot is wrong (Triton 3.7), so there a goes to fp32 (exact) and
        the product is IEEE fp32."""
        if INTERP or a.dtype == tl.float32:
            a = a.to(tl.float32)
            prec: tl.constexpr = "ieee"
        else:
            prec: tl.constexpr = PREC
        if SWAP:
            return acc + tl.dot(w, a, input_precision=prec) * s[:, None]
        else:
            return acc + tl.dot(a, tl.trans(w), input_precision=prec) * s[None, :]

    @triton.jit
    def _acc_rows(acc, SWAP: tl.constexpr):
        """The accumulator as [BM, BN]."""
        if SWAP:
            return tl.trans(acc)
        else:
            return acc

    @triton.jit
    def _int4_gate_up_kernel(
        x_ptr, p_ptr, s_ptr, src_ptr, bounds_ptr, out_ptr, hidden, inter, stride_x, n_chunks, magic,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr, INTERP: tl.constexpr, SWAP: tl.constexpr,
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
        kc = _kcols(BLOCK_K)
        kp8 = tl.arange(0, BLOCK_K // 8)[None, :]  # the packed columns of one K tile
        dt = x_ptr.dtype.element_ty
        # Static loop bound (enough chunks for an expert that got every copy), empty chunks skipped: a
        # data-dependent bound would need the expert's row count on the host.
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # copies * row width may pass 2^31
                m_ok = m < end
                # rows past the expert's read token 0: their output columns are never stored
                src = tl.load(src_ptr + m, mask=m_ok, other=0).to(tl.int64)
                acc_g = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                acc_u = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                for k0 in range(0, hidden, BLOCK_K):  # hidden: a multiple of GROUP, GROUP of BLOCK_K
                    xt = _load_rows(x_ptr + src * stride_x, k0 + kc, SWAP)
                    col = k0 // 8 + kp8
                    qg = _dequant(tl.load(p_gate + col, mask=n_ok[:, None], other=0), magic, dt, BLOCK_N,
                                  BLOCK_K, INTERP)  # fmt: skip
                    qu = _dequant(tl.load(p_up + col, mask=n_ok[:, None], other=0), magic, dt, BLOCK_N,
                                  BLOCK_K, INTERP)  # fmt: skip
                    sg = tl.load(s_gate + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    su = tl.load(s_up + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc_g = _acc_add(acc_g, xt, qg, sg, PREC, INTERP, SWAP)
                    acc_u = _acc_add(acc_u, xt, qu, su, PREC, INTERP, SWAP)
                # SwiGLU rounded as the per-expert loop and the trainer round it: gate and up outputs
                # to x's dtype, silu(gate) to x's dtype, then the product (a no-op for fp32).
                g = _rounded(_acc_rows(acc_g, SWAP), dt, INTERP)
                u = _rounded(_acc_rows(acc_u, SWAP), dt, INTERP)
                act = _rounded(_rounded(g * tl.sigmoid(g), dt, INTERP) * u, dt, INTERP)
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(out_ptr + m[:, None] * inter + n[None, :], act.to(dt), mask=omask)

    @triton.jit
    def _int4_down_kernel(
        a_ptr, p_ptr, s_ptr, bounds_ptr, out_ptr, hidden, inter, n_chunks, magic,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PREC: tl.constexpr, INTERP: tl.constexpr, SWAP: tl.constexpr,
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
        kc = _kcols(BLOCK_K)
        kp8 = tl.arange(0, BLOCK_K // 8)[None, :]
        dt = a_ptr.dtype.element_ty
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # copies * row width may pass 2^31
                m_ok = m < end
                rows = tl.minimum(m, end - 1)  # rows past the expert's repeat its last: never stored
                acc = _acc_zeros(BLOCK_M, BLOCK_N, SWAP)
                for k0 in range(0, inter, BLOCK_K):
                    a = _load_rows(a_ptr + rows * inter, k0 + kc, SWAP)
                    q = _dequant(tl.load(p_w + k0 // 8 + kp8, mask=n_ok[:, None], other=0), magic, dt,
                                 BLOCK_N, BLOCK_K, INTERP)  # fmt: skip
                    s = tl.load(s_w + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc = _acc_add(acc, a, q, s, PREC, INTERP, SWAP)
                omask = m_ok[:, None] & n_ok[None, :]
                y = _rounded(_acc_rows(acc, SWAP), dt, INTERP).to(dt)
                tl.store(out_ptr + m[:, None] * hidden + n[None, :], y, mask=omask)


def _launch_config(cfg: dict, group_size: int) -> dict:
    """The kernel arguments of a config (its K tile fitted to the group); pipelining settings only where
    they mean something (CUDA)."""
    out = dict(cfg, BLOCK_K=block_k(group_size, cfg["BLOCK_K"]))
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {k: out[k] for k in ("BLOCK_N", "BLOCK_K")}
    return out


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
    bm = block_m(x.shape[0], m, num_experts)
    chunks = triton.cdiv(m, bm)  # enough for an expert that got every copy
    bits = MAGIC.get(x.dtype, MAGIC[torch.bfloat16])[0]  # fp32 x: bf16 values, then fp32
    common = dict(
        GROUP=group_size, BLOCK_M=bm,
        PREC="ieee" if x.dtype == torch.float32 else "tf32",
        INTERP=os.environ.get("TRITON_INTERPRET") == "1", SWAP=swapped(bm),
    )  # fmt: skip
    c1, c2 = _launch_config(GATE_UP, group_size), _launch_config(DOWN, group_size)
    grid1 = (num_experts, triton.cdiv(inter, c1["BLOCK_N"]))
    _int4_gate_up_kernel[grid1](
        x, gate_up_packed.contiguous(), gate_up_scale.contiguous(), src, bounds, act, hidden, inter,
        x.stride(0), chunks, bits | bits << 16, **common, **c1,
    )  # fmt: skip
    grid2 = (num_experts, triton.cdiv(hidden, c2["BLOCK_N"]))
    _int4_down_kernel[grid2](
        act, down_packed.contiguous(), down_scale.contiguous(), bounds, out, hidden, inter, chunks,
        bits | bits << 16, **common, **c2,
    )  # fmt: skip
    return out


@int4_experts.register_fake
def _(x, src, bounds, gate_up_packed, gate_up_scale, down_packed, down_scale, group_size):
    return x.new_empty(src.shape[0], x.shape[1])
