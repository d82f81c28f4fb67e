"""Backward kernels of `invariant_fused`: the gradients of the fused ops in one Triton kernel each.

Recomputing a fused op's forward in eager torch to differentiate it (`invariant_kernels._TorchGrad`) would
launch every small kernel the fusion saved, in the backward instead of the forward. These kernels compute
the same gradients from closed forms in fp32 (the roundings of the forward pass gradients straight
through, as autograd's casts do); the guarantee does not depend on the backward's order, only the
forward's. A norm weight's gradient (a sum over rows) is written per row and summed by torch.
"""

from __future__ import annotations

import torch

from miles_core.model.invariant_kernels import tl, triton

ROW_BLOCK = 1024
ELEM_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _rms_norm_bwd_kernel(x_ptr, w_ptr, gy_ptr, gs_ptr, gx_ptr, gwp_ptr, d, eps, HAS_GS: tl.constexpr,
                             BLOCK: tl.constexpr):  # fmt: skip
        """Row of y = w * x * inv: gx = inv (gn - n mean(gn n)) (+ gs), gn = gy w; gwp = gy * n."""
        row = tl.program_id(0).to(tl.int64)
        dt = x_ptr.dtype.element_ty
        sq = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + row * d + c, mask=c < d, other=0.0).to(tl.float32)
            sq += xv * xv
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / d + eps)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < d
            xv = tl.load(x_ptr + row * d + c, mask=ok, other=0.0).to(tl.float32)
            gn = tl.load(gy_ptr + row * d + c, mask=ok, other=0.0).to(tl.float32) * tl.load(
                w_ptr + c, mask=ok, other=0.0).to(tl.float32)  # fmt: skip
            dot += gn * xv * inv
        mean = tl.sum(dot, axis=0) / d
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < d
            n = tl.load(x_ptr + row * d + c, mask=ok, other=0.0).to(tl.float32) * inv
            gy = tl.load(gy_ptr + row * d + c, mask=ok, other=0.0).to(tl.float32)
            gx = inv * (gy * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32) - n * mean)
            if HAS_GS:
                gx += tl.load(gs_ptr + row * d + c, mask=ok, other=0.0).to(tl.float32)
            tl.store(gx_ptr + row * d + c, gx.to(dt), mask=ok)
            tl.store(gwp_ptr + row * d + c, gy * n.to(dt).to(tl.float32), mask=ok)

    @triton.jit
    def _rope_bwd_kernel(g_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, gx_ptr, gwp_ptr, heads, half, sgt, sgh, sxt,
                         sxh, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """Program (token, head): the rotation's transpose, then (NORM) the norm's backward."""
        tok = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1).to(tl.int64)
        c = tl.arange(0, BLOCK)
        ok = c < half
        gsrc = g_ptr + tok * sgt + hd * sgh
        g1 = tl.load(gsrc + c, mask=ok, other=0.0).to(tl.float32)
        g2 = tl.load(gsrc + half + c, mask=ok, other=0.0).to(tl.float32)
        tab = tok * 2 * half + c
        c1 = tl.load(cos_ptr + tab, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + half + tab, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + half + tab, mask=ok, other=0.0).to(tl.float32)
        gr1 = g1 * c1 + g2 * s2  # out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2
        gr2 = g2 * c2 - g1 * s1
        dst = (tok * heads + hd) * 2 * half + c
        dt = gx_ptr.dtype.element_ty
        if NORM:
            src = x_ptr + tok * sxt + hd * sxh
            x1 = tl.load(src + c, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(src + half + c, mask=ok, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * half) + eps)
            n1, n2 = x1 * inv, x2 * inv
            tl.store(gwp_ptr + dst, gr1 * n1.to(dt).to(tl.float32), mask=ok)
            tl.store(gwp_ptr + dst + half, gr2 * n2.to(dt).to(tl.float32), mask=ok)
            gn1 = gr1 * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
            gn2 = gr2 * tl.load(w_ptr + half + c, mask=ok, other=0.0).to(tl.float32)
            mean = (tl.sum(gn1 * n1, axis=0) + tl.sum(gn2 * n2, axis=0)) / (2 * half)
            gr1, gr2 = inv * (gn1 - n1 * mean), inv * (gn2 - n2 * mean)
        tl.store(gx_ptr + dst, gr1.to(dt), mask=ok)
        tl.store(gx_ptr + dst + half, gr2.to(dt), mask=ok)

    @triton.jit
    def _silu_mul_bwd_kernel(go_ptr, g_ptr, u_ptr, gg_ptr, gu_ptr, n, cols, sx, BLOCK: tl.constexpr):
        """go [n / cols, cols] contiguous; g/u and their grads at ``row * sx + col``."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        at = i // cols * sx + i % cols
        go = tl.load(go_ptr + i, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(gu_ptr + at, (go * g * sig).to(gu_ptr.dtype.element_ty), mask=ok)
        tl.store(gg_ptr + at, (go * u * sig * (1.0 + g * (1.0 - sig))).to(gg_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _combine_bwd_kernel(go_ptr, ys_ptr, dest_ptr, w_ptr, gys_ptr, gw_ptr, hidden, K: tl.constexpr,
                            BLOCK: tl.constexpr):  # fmt: skip
        """Program per copy i = t K + j: gys[dest[i]] = go[t] * w[t, j]; gw[t, j] = go[t] . ys[dest[i]]."""
        i = tl.program_id(0).to(tl.int64)
        t = i // K
        row = tl.load(dest_ptr + i).to(tl.int64)
        dt = gys_ptr.dtype.element_ty
        wj = tl.load(w_ptr + i).to(dt).to(tl.float32)  # as the forward: the weight in ys' dtype
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, hidden, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < hidden
            go = tl.load(go_ptr + t * hidden + c, mask=ok, other=0.0).to(tl.float32)
            tl.store(gys_ptr + row * hidden + c, (go * wj).to(dt), mask=ok)
            dot += go * tl.load(ys_ptr + row * hidden + c, mask=ok, other=0.0).to(tl.float32)
        tl.store(gw_ptr + i, tl.sum(dot, axis=0))


def _block(d: int) -> int:
    return min(ROW_BLOCK, triton.next_power_of_2(d))


def rms_norm_bwd(s, weight, eps, gy, gs):
    """(grad of s, grad of weight) for ``y = weight * rms_norm(s)``; ``gs`` the grad reaching s directly
    (the residual stream) or None. s/gy/gs ``[..., D]``."""
    d = s.shape[-1]
    x, g = s.reshape(-1, d).contiguous(), gy.reshape(-1, d).contiguous()
    gsr = None if gs is None else gs.reshape(-1, d).contiguous()
    gx = torch.empty_like(x)
    gwp = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _rms_norm_bwd_kernel[(x.shape[0],)](
            x, weight.contiguous(), g, x if gsr is None else gsr, gx, gwp, d, eps, HAS_GS=gs is not None,
            BLOCK=_block(d),
        )  # fmt: skip
    return gx.reshape(s.shape), gwp.sum(0).to(weight.dtype)


def rope_bwd(grad, x, weight, cos, sin, eps):
    """(grad of x ``[B, T, heads, D]``, grad of weight or None) for `invariant_fused.rope`; grad is the
    output's ``[B, heads, T, D]`` gradient, cos/sin the forward's ``[B*T, D]`` tables."""
    b, t, heads, d = x.shape
    g = grad.transpose(1, 2).reshape(b * t, heads, d)
    xs = x.reshape(b * t, heads, d)
    g, xs = (v if v.stride(-1) == 1 else v.contiguous() for v in (g, xs))
    gx = torch.empty(b, t, heads, d, dtype=x.dtype, device=x.device)
    gwp = torch.empty(b * t * heads, d, dtype=torch.float32, device=x.device) if weight is not None else gx
    if b * t:
        _rope_bwd_kernel[(b * t, heads)](
            g, xs, xs if weight is None else weight.contiguous(), cos, sin, gx, gwp, heads, d // 2,
            g.stride(0), g.stride(1), xs.stride(0), xs.stride(1), eps, NORM=weight is not None,
            BLOCK=max(16, triton.next_power_of_2(d // 2)),
        )  # fmt: skip
    return gx, None if weight is None else gwp.sum(0).to(weight.dtype)


def silu_mul_bwd(grad, gate, up, gg, gu, cols: int) -> None:
    """Writes the grads of gate and up for ``silu(gate) * up`` into gg / gu; gate, up, gg and gu share
    one row stride (their element (row, col) at ``row * stride + col``), grad ``[rows, cols]``."""
    go = grad.contiguous()
    if go.numel():
        grid = (triton.cdiv(go.numel(), ELEM_BLOCK),)
        sx = gate.stride(0) if gate.dim() == 2 else cols
        _silu_mul_bwd_kernel[grid](go, gate, up, gg, gu, go.numel(), cols, sx, BLOCK=ELEM_BLOCK)


def combine_bwd(grad, ys, dest, weight):
    """(grad of ys ``[N k, H]``, grad of weight ``[N, k]``) for `invariant_fused.combine`."""
    n, k = weight.shape
    hidden = ys.shape[-1]
    gys = torch.empty(ys.shape, dtype=ys.dtype, device=ys.device)
    gw = torch.empty(n, k, dtype=torch.float32, device=ys.device)
    if n:
        _combine_bwd_kernel[(n * k,)](
            grad.contiguous(), ys, dest, weight, gys, gw, hidden, K=k, BLOCK=_block(hidden)
        )  # fmt: skip
    return gys, gw.to(weight.dtype)
