"""Causal attention over packed sequences for training, in Triton: forward and backward.

The trainer packs many short sequences (a GRPO sample is a few hundred tokens) into one row, and the
attention must stay within each sequence (``cu_seqlens``). The flash-attention 2 kernels that torch
ships do this, but on Hopper with a head size of 64 and sequences of a few hundred tokens they reach
about 90 TFLOP/s, and their grouped-query backward writes K/V gradients per query head and sums them
afterwards. These kernels:

- forward: one program per (query block, sequence, head); the key blocks strictly below the diagonal
  run without masks, only the diagonal ones are masked. It keeps the row's log-sum-exp (base 2).
- backward: one program per (key block, sequence, KV head) accumulates dK/dV over all the query heads
  that share the KV head (no per-head copies to sum), and one program per (query block, sequence,
  head) accumulates dQ. No atomics, so the result is deterministic.

q ``[T, H, D]``, k/v ``[T, Hkv, D]`` (any strides with a unit last stride), ``cu_seqlens`` int32
``[B + 1]``. Registered as custom ops, opaque to ``torch.compile``: only ``cu_seqlens`` and the max
length (a plain int) change per micro-batch, so a compiled layer does not recompile.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install
    triton = None
    tl = None

# Block sizes and warps: the fastest of a sweep on an H200 at D = 64, 383-token sequences.
FWD = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
BWD_KV = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
BWD_Q = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
LOG2E = 1.4426950408889634


def supports(head_dim: int) -> bool:
    """Whether these kernels are built here (triton installed) and take this head size (a power of
    two from 16 to 256)."""
    return triton is not None and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _load_rows(base, rows, stride, offs_d, mask):
        """Rows `rows` [R] of a [*, D] view (row stride `stride`), zero where `mask` is off."""
        return tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=mask[:, None], other=0.0)

    @triton.jit
    def _store_rows(base, rows, stride, offs_d, x, mask):
        ptrs = base + rows[:, None] * stride + offs_d[None, :]
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask[:, None])

    @triton.jit
    def _sequence(CU, b):
        """(first row, length) of packed sequence b."""
        start = tl.load(CU + b).to(tl.int64)
        return start, tl.load(CU + b + 1).to(tl.int64) - start

    @triton.jit
    def _load_kv(k_base, v_base, cols, seq, skt, svt, offs_d, MASK: tl.constexpr):
        """Key and value rows `cols` of one KV head; only a diagonal block (MASK) can pass the end."""
        if MASK:
            k = _load_rows(k_base, cols, skt, offs_d, cols < seq)
            v = _load_rows(v_base, cols, svt, offs_d, cols < seq)
        else:
            k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :])
        return k, v

    @triton.jit
    def _query_block(Q, K, V, start, seq, m0, h, sqt, sqh, skt, skh, svt, svh,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
        """A query-block program's rows, their mask and q, and its KV head's key and value bases."""
        kvh = h // GROUP
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < seq
        q = _load_rows(Q + start * sqt + h * sqh, rows, sqt, tl.arange(0, D), rmask)
        return rows, rmask, q, K + start * skt + kvh * skh, V + start * svt + kvh * svh

    @triton.jit
    def _fwd_step(q, k_base, v_base, m_i, l_i, acc, n0, rows, seq, skt, svt, qk_scale, offs_n, offs_d,
                  MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        cols = n0 + offs_n
        k, v = _load_kv(k_base, v_base, cols, seq, skt, svt, offs_d, MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASK:
            s = tl.where((rows[:, None] >= cols[None, :]) & (cols < seq)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _fwd_kernel(Q, K, V, Out, LSE, CU, qk_scale, T,
                    sqt, sqh, skt, skh, svt, svh, sot, soh,
                    GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        mb, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, seq = _sequence(CU, b)
        m0 = mb * BLOCK_M
        if m0 >= seq:
            return
        rows, rmask, q, k_base, v_base = _query_block(
            Q, K, V, start, seq, m0, h, sqt, sqh, skt, skh, svt, svh, GROUP, D, BLOCK_M
        )
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, m0, BLOCK_N):  # below the diagonal: every key is visible
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, m_i, l_i, acc, n0, rows, seq, skt, svt, qk_scale,
                                      offs_n, offs_d, False, PREC)  # fmt: skip
        for n0 in range(m0, tl.minimum(m0 + BLOCK_M, seq), BLOCK_N):  # the diagonal blocks
            m_i, l_i, acc = _fwd_step(q, k_base, v_base, m_i, l_i, acc, n0, rows, seq, skt, svt, qk_scale,
                                      offs_n, offs_d, True, PREC)  # fmt: skip
        acc = acc / l_i[:, None]
        _store_rows(Out + start * sot + h * soh, rows, sot, offs_d, acc, rmask)
        tl.store(LSE + h * T + start + rows, m_i + tl.math.log2(l_i), mask=rmask)

    @triton.jit
    def _kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, m0, cols, seq, sqt, sdot, qk_scale,
                 offs_m, offs_d, MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        rows = m0 + offs_m
        rmask = rows < seq
        q = _load_rows(q_base, rows, sqt, offs_d, rmask)
        do = _load_rows(do_base, rows, sdot, offs_d, rmask)
        lse = tl.load(lse_base + rows, mask=rmask, other=float("inf"))  # padding rows: p = 0
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])  # [N, M]
        if MASK:
            p_t = tl.where(rows[None, :] >= cols[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
        return dk, dv

    @triton.jit
    def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale, sm_scale, T,
                       sqt, sqh, skt, skh, svt, svh, sdot, sdoh, sdkt, sdkh, sdvt, sdvh,
                       GROUP: tl.constexpr, D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        nb, b, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, seq = _sequence(CU, b)
        n0 = nb * BLOCK_N
        if n0 >= seq:
            return
        cols = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        cmask = cols < seq
        k = _load_rows(K + start * skt + kvh * skh, cols, skt, offs_d, cmask)
        v = _load_rows(V + start * svt + kvh * svh, cols, svt, offs_d, cmask)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for g in range(GROUP):  # every query head that reads this KV head
            h = kvh * GROUP + g
            q_base = Q + start * sqt + h * sqh
            do_base = DO + start * sdot + h * sdoh
            lse_base = LSE + h * T + start
            delta_base = DELTA + h * T + start
            # Query blocks at or after the key block (causal); those overlapping it are masked.
            for m0 in range(n0, tl.minimum(n0 + BLOCK_N, seq), BLOCK_M):
                dk, dv = _kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, m0, cols, seq, sqt,
                                  sdot, qk_scale, offs_m, offs_d, True, PREC)  # fmt: skip
            for m0 in range(n0 + BLOCK_N, seq, BLOCK_M):
                dk, dv = _kv_step(k, v, dk, dv, q_base, do_base, lse_base, delta_base, m0, cols, seq, sqt,
                                  sdot, qk_scale, offs_m, offs_d, False, PREC)  # fmt: skip
        dk = dk * sm_scale
        _store_rows(DK + start * sdkt + kvh * sdkh, cols, sdkt, offs_d, dk, cmask)
        _store_rows(DV + start * sdvt + kvh * sdvh, cols, sdvt, offs_d, dv, cmask)

    @triton.jit
    def _q_step(q, do, lse, delta, dq, k_base, v_base, n0, rows, seq, skt, svt, qk_scale, offs_n, offs_d,
                MASK: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        cols = n0 + offs_n
        k, v = _load_kv(k_base, v_base, cols, seq, skt, svt, offs_d, MASK)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])
        if MASK:
            p = tl.where((rows[:, None] >= cols[None, :]) & (cols < seq)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    @triton.jit
    def _bwd_q_kernel(Q, K, V, Out, DO, LSE, DELTA, DQ, CU, qk_scale, sm_scale, T,
                      sqt, sqh, skt, skh, svt, svh, sot, soh, sdot, sdoh, sdqt, sdqh,
                      GROUP: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        mb, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start, seq = _sequence(CU, b)
        m0 = mb * BLOCK_M
        if m0 >= seq:
            return
        rows, rmask, q, k_base, v_base = _query_block(
            Q, K, V, start, seq, m0, h, sqt, sqh, skt, skh, svt, svh, GROUP, D, BLOCK_M
        )
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        do = _load_rows(DO + start * sdot + h * sdoh, rows, sdot, offs_d, rmask)
        o = _load_rows(Out + start * sot + h * soh, rows, sot, offs_d, rmask)
        # delta = rowsum(dO * O), kept for the dK/dV kernel that runs next.
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + h * T + start + rows, delta, mask=rmask)
        lse = tl.load(LSE + h * T + start + rows, mask=rmask, other=float("inf"))
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(0, m0, BLOCK_N):
            dq = _q_step(q, do, lse, delta, dq, k_base, v_base, n0, rows, seq, skt, svt, qk_scale, offs_n,
                         offs_d, False, PREC)  # fmt: skip
        for n0 in range(m0, tl.minimum(m0 + BLOCK_M, seq), BLOCK_N):  # the diagonal blocks
            dq = _q_step(q, do, lse, delta, dq, k_base, v_base, n0, rows, seq, skt, svt, qk_scale, offs_n,
                         offs_d, True, PREC)  # fmt: skip
        dq = dq * sm_scale
        _store_rows(DQ + start * sdqt + h * sdqh, rows, sdqt, offs_d, dq, rmask)


def _precision(q: torch.Tensor) -> str:
    """fp32 inputs multiply in full fp32 (tl.dot would use TF32); bf16/fp16 ones natively."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_blocks() -> None:
    # The unmasked loops start where the diagonal blocks end, so one block size must divide the other.
    checks = (("FWD", FWD, "BLOCK_M", "BLOCK_N"), ("BWD_Q", BWD_Q, "BLOCK_M", "BLOCK_N"),
              ("BWD_KV", BWD_KV, "BLOCK_N", "BLOCK_M"))  # fmt: skip
    for name, cfg, big, small in checks:
        if cfg[big] % cfg[small]:
            raise ValueError(f"varlen_attention.{name}: {big} must be a multiple of {small}, got {cfg}")


@torch.library.custom_op("miles::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, H, D], lse [H, T] fp32: the base-2 log-sum-exp of each row's scaled scores) of causal
    attention within each packed sequence."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    t, h, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(h, t, device=q.device, dtype=torch.float32)
    b = cu_seqlens.numel() - 1
    if t == 0 or b == 0:
        return out, lse
    _check_blocks()
    _fwd_kernel[(triton.cdiv(max_len, FWD["BLOCK_M"]), b, h)](
        q, k, v, out, lse, cu_seqlens, scale * LOG2E, t, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1), GROUP=h // k.shape[1], D=d,
        PREC=_precision(q), **FWD,
    )  # fmt: skip
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, max_len, scale):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("miles::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dq, dk, dv) of `varlen_attention_fwd` for the output gradient `grad`."""
    grad, q, k, v, out = (_unit_last(x) for x in (grad, q, k, v, out))
    t, h, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    b = cu_seqlens.numel() - 1
    if t == 0 or b == 0:
        return dq, dk, dv
    _check_blocks()
    delta = torch.empty(h, t, device=q.device, dtype=torch.float32)  # written by the dQ kernel
    common = (scale * LOG2E, scale, t, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
              v.stride(1))  # fmt: skip
    consts = dict(GROUP=h // hkv, D=d, PREC=_precision(q))
    _bwd_q_kernel[(triton.cdiv(max_len, BWD_Q["BLOCK_M"]), b, h)](
        q, k, v, out, grad, lse, delta, dq, cu_seqlens, *common, out.stride(0), out.stride(1), grad.stride(0),
        grad.stride(1), dq.stride(0), dq.stride(1), **consts, **BWD_Q,
    )  # fmt: skip
    _bwd_kv_kernel[(triton.cdiv(max_len, BWD_KV["BLOCK_N"]), b, hkv)](
        q, k, v, grad, lse, delta, dk, dv, cu_seqlens, *common, grad.stride(0), grad.stride(1), dk.stride(0),
        dk.stride(1), dv.stride(0), dv.stride(1), **consts, **BWD_KV,
    )  # fmt: skip
    return dq, dk, dv


@varlen_attention_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_len, scale):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


class VarlenAttention(torch.autograd.Function):
    """Differentiable `varlen_attention_fwd` (softmax scale 1/sqrt(D))."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int):
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens, max_len, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = varlen_attention_bwd(grad, q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
        return dq, dk, dv, None, None
