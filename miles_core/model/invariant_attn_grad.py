"""Backward of the batch-invariant attention (`invariant_kernels.attention`) in Triton, flash-attention style.

The forward keeps each query row's log-sum-exp (fp32); the backward recomputes the probabilities block by
block from it instead of running the attention again in torch (masked SDPA over repeated K/V) to
differentiate that. With ``delta = rowsum(dO * O)`` and ``dS = P * (dP - delta)``:

- dQ: one program per tile of query rows of a (sequence, KV head), the GQA heads folded in as in the
  forward, visiting the key blocks up to the tile's last visible key; it writes ``delta`` as well;
- dK/dV: one program per block of keys of a (sequence, KV head), summing over every query row of the
  ``rep`` heads that read it (a row tile whose queries all stop before the block is skipped).

Each output element is written by one program in a fixed order (no atomics), so the gradients are
deterministic; fp32 accumulation, outputs in q's dtype. The order need not match anything: only the
forward's log-probs carry the bitwise guarantee. Grids derive from the shapes alone.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: `batch_invariant` keeps its torch ops
    triton = None
    tl = None

BWD_Q = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
BWD_KV = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


if triton is not None:

    @triton.jit
    def _rows(r, t, rep, kh, g, hkv):
        """Query row r of a (sequence, KV head) tile: (head, time, its row in ``[G, H, T]``)."""
        head = kh * rep + r // t
        ti = r % t
        return head, ti, (g * hkv * rep + head) * t + ti

    @triton.jit(do_not_specialize=["t", "rows"])
    def _bwd_q_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, t, rows, rep,
                      hkv, d, sm_scale, sqg, sqh, sqt, skg, skh, skl, svg, svh, svl, sdg, sdh, sdt,
                      PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
        gk = tl.program_id(1)
        g = gk // hkv
        kh = gk % hkv
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = r < rows
        head, ti, hrow = _rows(r, t, rep, kh, g, hkv)
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        rd_ok = r_ok[:, None] & d_ok[None, :]
        pos = tl.load(pos_ptr + g * t + ti, mask=r_ok, other=-1)  # padding rows see no key
        q = tl.load((q_ptr + g * sqg + head * sqh + ti * sqt)[:, None] + dd[None, :], mask=rd_ok, other=0.0)
        do = tl.load((do_ptr + g * sdg + head * sdh + ti * sdt)[:, None] + dd[None, :], mask=rd_ok, other=0.0)
        o = tl.load(o_ptr + hrow[:, None] * d + dd[None, :], mask=rd_ok, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(delta_ptr + hrow, delta, mask=r_ok)  # for the dK/dV kernel, which runs next
        lse = tl.load(lse_ptr + hrow, mask=r_ok, other=0.0)
        kb = k_ptr + g * skg + kh * skh
        vb = v_ptr + g * svg + kh * svh
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = tl.max(pos, axis=0) + 1
        for start in range(0, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            kd_ok = (keys < hi)[:, None] & d_ok[None, :]
            k = tl.load(kb + keys[:, None] * skl + dd[None, :], mask=kd_ok, other=0.0)
            v = tl.load(vb + keys[:, None] * svl + dd[None, :], mask=kd_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
            p = tl.where(keys[None, :] <= pos[:, None], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(dq_ptr + hrow[:, None] * d + dd[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=rd_ok)  # fmt: skip

    @triton.jit(do_not_specialize=["t", "rows", "length"])
    def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, t, rows,
                       length, rep, hkv, d, sm_scale, sqg, sqh, sqt, skg, skh, skl, svg, svh, svl, sdg, sdh,
                       sdt, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr):  # fmt: skip
        gk = tl.program_id(1)
        g = gk // hkv
        kh = gk % hkv
        n0 = tl.program_id(0) * BLOCK_N
        keys = n0 + tl.arange(0, BLOCK_N)
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        kd_ok = (keys < length)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + g * skg + kh * skh + keys[:, None] * skl + dd[None, :], mask=kd_ok, other=0.0)
        v = tl.load(v_ptr + g * svg + kh * svh + keys[:, None] * svl + dd[None, :], mask=kd_ok, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for m0 in range(0, rows, BLOCK_M):  # every query row of the rep heads reading this KV head
            r = m0 + tl.arange(0, BLOCK_M)
            r_ok = r < rows
            head, ti, hrow = _rows(r, t, rep, kh, g, hkv)
            pos = tl.load(pos_ptr + g * t + ti, mask=r_ok, other=-1)
            if tl.max(pos, axis=0) >= n0:  # some row of the tile sees a key of this block
                rd_ok = r_ok[:, None] & d_ok[None, :]
                q = tl.load((q_ptr + g * sqg + head * sqh + ti * sqt)[:, None] + dd[None, :], mask=rd_ok,
                            other=0.0)  # fmt: skip
                do = tl.load((do_ptr + g * sdg + head * sdh + ti * sdt)[:, None] + dd[None, :], mask=rd_ok,
                             other=0.0)  # fmt: skip
                lse = tl.load(lse_ptr + hrow, mask=r_ok, other=0.0)
                delta = tl.load(delta_ptr + hrow, mask=r_ok, other=0.0)
                s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * sm_scale  # [keys, rows]
                p_t = tl.where(keys[:, None] <= pos[None, :], tl.exp(s_t - lse[None, :]), 0.0)
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
        out = ((g * hkv + kh) * length + keys)[:, None] * d + dd[None, :]
        tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kd_ok)
        tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kd_ok)


def _cfg(cfg: dict) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":  # pipelining settings mean nothing to the interpreter
        return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    return dict(cfg)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention_bwd(grad, q, k, v, pos, out, lse):
    """(dq, dk, dv) of the attention for the output gradient ``grad`` ``[G, H, T, D]``.

    :param pos: int32 ``[G, T]`` (contiguous): query t sees keys ``0..pos[t]``; ``out`` ``[G, H, T, D]``
        and ``lse`` fp32 ``[G, H, T]`` (contiguous) are the forward's output and row log-sum-exp.
    :returns: dq ``[G, H, T, D]``, dk and dv ``[G, Hkv, L, D]`` (contiguous), in q's dtype."""
    grad, q, k, v = (_unit_last(x) for x in (grad, q, k, v))
    g, h, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    rep = h // hkv
    dq = torch.empty(g, h, t, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(g, hkv, length, d, dtype=k.dtype, device=q.device)  # every row written below
    dv = torch.empty(g, hkv, length, d, dtype=v.dtype, device=q.device)
    if g * t * length == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty(g, h, t, dtype=torch.float32, device=q.device)
    common = (t, rep * t)
    shape = (rep, hkv, d, 1.0 / math.sqrt(d), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
             k.stride(2), v.stride(0), v.stride(1), v.stride(2), grad.stride(0), grad.stride(1),
             grad.stride(2))  # fmt: skip
    prec = "ieee" if q.dtype == torch.float32 else None  # fp32: no TF32
    consts = {"PREC": prec, "BLOCK_D": max(16, triton.next_power_of_2(d))}
    _bwd_q_kernel[(triton.cdiv(rep * t, BWD_Q["BLOCK_M"]), g * hkv)](
        q, k, v, pos, out, grad, lse, delta, dq, *common, *shape, **consts, **_cfg(BWD_Q)
    )
    _bwd_kv_kernel[(triton.cdiv(length, BWD_KV["BLOCK_N"]), g * hkv)](
        q, k, v, pos, grad, lse, delta, dk, dv, *common, length, *shape, **consts, **_cfg(BWD_KV)
    )
    return dq, dk, dv


class Attention(torch.autograd.Function):
    """`invariant_kernels.attention` with the backward above; ``fwd(q, k, v, pos, True)`` is its forward
    kernel returning ``(out, lse)`` (out bit for bit what it returns without the log-sum-exp)."""

    @staticmethod
    def forward(ctx, fwd, q, k, v, q_pos):
        pos = q_pos.to(torch.int32).contiguous()
        out, lse = fwd(q, k, v, pos, True)
        ctx.save_for_backward(q, k, v, pos, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        dq, dk, dv = attention_bwd(grad, *ctx.saved_tensors)
        need = ctx.needs_input_grad
        return None, dq if need[1] else None, dk if need[2] else None, dv if need[3] else None, None
