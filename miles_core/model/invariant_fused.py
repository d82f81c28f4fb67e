"""Fused elementwise kernels of ``--true-on-policy-mode`` on CUDA: the small ops around the matmuls.

The mode cannot compile (inductor would round elementwise chains differently on the two sides), so in eager
every residual add, norm weight, rope term, SwiGLU step, MoE weighting and cast was its own kernel (about
45% of the mode's GPU time on the 0.7B bench). Each op here is one Triton kernel in which every element is
computed by one fixed formula, rounded to the model dtype after each step as eager torch does, whatever
the batch, the element's place in the tile, or whether it runs in a decode step, a prefill or a packed or
padded training micro-batch; the engine and the trainer call the same kernels, so they get the same bits:

- `add_rms_norm`: ``s = h + delta`` (rounded) and ``weight * rms_norm(s)`` in one row kernel (``delta``
  None: the norm alone);
- `rope`: q or k's optional per-head RMSNorm (Qwen3's q/k norm) and rotary embedding in one kernel;
- `silu_mul`: the dense MLP's SwiGLU, rounded like the expert kernels' epilogue (`swiglu`: the same over
  the two halves of one tensor, for the experts' backward);
- `combine`: each token's k expert outputs, un-sorted and weighted, added in routing order;
- `cache_write`: a step's K and V written into the KV cache at each row's slot and positions (a copy).

The router's softmax, top-k and expert ordering are fused in `invariant_routing`.

Row kernels reduce in their load layout, which Triton picks from pointer alignment and integer values, so
every pointer and integer argument is kept unspecialized: one compiled kernel per dtype serves every call.
Each op's backward is a kernel of `invariant_fused_grad`.
"""

from __future__ import annotations

import torch

from miles_core.model import invariant_fused_grad as fg
from miles_core.model.invariant_kernels import available, tl, triton

__all__ = ["add_rms_norm", "available", "cache_write", "combine", "rope", "silu_mul", "swiglu"]

ROW_BLOCK = 1024  # columns per step of the row kernels (as `invariant_kernels.ROW_BLOCK`)
ELEM_BLOCK = 1024  # elements per program of the elementwise kernels


def _pin(*ptrs: str, ints: tuple[str, ...]) -> dict:
    return {"do_not_specialize": list(ints), "do_not_specialize_on_alignment": list(ptrs)}


if triton is not None:

    @triton.jit
    def _r(x, DT: tl.constexpr):
        """x rounded to the model dtype, back in fp32 (a no-op for fp32 models)."""
        return x.to(DT).to(tl.float32)

    @triton.jit(**_pin("x_ptr", "r_ptr", "w_ptr", "s_ptr", "out_ptr", ints=("d", "sx", "sr")))
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, s_ptr, out_ptr, d, sx, sr, eps, HAS_RES: tl.constexpr,
                             BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        dt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            ok = c < d
            xv = tl.load(x_ptr + row * sx + c, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:  # the sum rounded to the dtype first, as ``h + delta`` in eager
                xv = _r(xv + tl.load(r_ptr + row * sr + c, mask=ok, other=0.0).to(tl.float32), dt)
                tl.store(s_ptr + row * d + c, xv.to(dt), mask=ok)
            acc += xv * xv
        inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / d + eps)
        for c0 in range(0, d, BLOCK):  # the sum recomputed, not re-read: other threads stored it
            c = c0 + tl.arange(0, BLOCK)
            ok = c < d
            xv = tl.load(x_ptr + row * sx + c, mask=ok, other=0.0).to(tl.float32)
            if HAS_RES:
                xv = _r(xv + tl.load(r_ptr + row * sr + c, mask=ok, other=0.0).to(tl.float32), dt)
            wv = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * d + c, (_r(xv * inv, dt) * wv).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(**_pin("x_ptr", "w_ptr", "cos_ptr", "sin_ptr", "out_ptr", ints=("heads", "half", "st", "sh")))
    def _rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, half, st, sh, eps, NORM: tl.constexpr,
                     BLOCK: tl.constexpr):  # fmt: skip
        """Program (token, head): the head's D = 2 half values, normed (NORM) then rotated."""
        tok = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1).to(tl.int64)
        dt = out_ptr.dtype.element_ty
        c = tl.arange(0, BLOCK)
        ok = c < half
        src = x_ptr + tok * st + hd * sh
        x1 = tl.load(src + c, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + half + c, mask=ok, other=0.0).to(tl.float32)
        if NORM:  # w * rms_norm(x).to(dt), as `layers.RMSNorm`
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * half) + eps)
            x1 = _r(_r(x1 * inv, dt) * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32), dt)
            x2 = _r(_r(x2 * inv, dt) * tl.load(w_ptr + half + c, mask=ok, other=0.0).to(tl.float32), dt)
        tab = tok * 2 * half + c
        c1 = tl.load(cos_ptr + tab, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + half + tab, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + tab, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + half + tab, mask=ok, other=0.0).to(tl.float32)
        dst = out_ptr + (tok * heads + hd) * 2 * half + c
        # x * cos + rotate_half(x) * sin, each product rounded, then the sum: rotate_half = (-x2, x1)
        tl.store(dst, (_r(x1 * c1, dt) - _r(x2 * s1, dt)).to(dt), mask=ok)
        tl.store(dst + half, (_r(x2 * c2, dt) + _r(x1 * s2, dt)).to(dt), mask=ok)

    @triton.jit(**_pin("g_ptr", "u_ptr", "out_ptr", ints=("n", "cols", "sx")))
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, cols, sx, BLOCK: tl.constexpr):
        """out [n / cols, cols] (contiguous) from gate and up elements at ``row * sx + col``."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        src = i // cols * sx + i % cols
        dt = out_ptr.dtype.element_ty
        g = tl.load(g_ptr + src, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + src, mask=ok, other=0.0).to(tl.float32)
        den = _r(1.0 + _r(tl.exp(-g), dt), dt)  # g / (1 + exp(-g)) * u, rounded after each op
        tl.store(out_ptr + i, (_r(g / den, dt) * u).to(dt), mask=ok)

    @triton.jit(**_pin("ys_ptr", "dest_ptr", "w_ptr", "out_ptr", ints=("hidden",)))
    def _combine_kernel(ys_ptr, dest_ptr, w_ptr, out_ptr, hidden, K: tl.constexpr, BLOCK: tl.constexpr):
        """out[t] = ((w0 y0 + w1 y1) + w2 y2) + ..., y_j = ys[dest[t K + j]], each product and sum rounded."""
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = c < hidden
        dt = out_ptr.dtype.element_ty
        row = tl.load(dest_ptr + t * K).to(tl.int64)
        wj = _r(tl.load(w_ptr + t * K).to(tl.float32), dt)
        acc = _r(tl.load(ys_ptr + row * hidden + c, mask=ok, other=0.0).to(tl.float32) * wj, dt)
        for j in tl.static_range(1, K):
            row = tl.load(dest_ptr + t * K + j).to(tl.int64)
            wj = _r(tl.load(w_ptr + t * K + j).to(tl.float32), dt)
            y = tl.load(ys_ptr + row * hidden + c, mask=ok, other=0.0).to(tl.float32)
            acc = _r(acc + _r(y * wj, dt), dt)
        tl.store(out_ptr + t * hidden + c, acc.to(dt), mask=ok)

    @triton.jit
    def _cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, t, d, skb, skh, skt, svb, svh,
                            svt, sc0, sc1, sc2, BLOCK_D: tl.constexpr):  # fmt: skip
        """Program (token b * t + i, head): k/v[b, head, i] -> cache[slots[b], head, pos[b, i]]."""
        tok = tl.program_id(0).to(tl.int64)
        hd = tl.program_id(1).to(tl.int64)
        b = tok // t
        i = tok % t
        at = tl.load(slot_ptr + b).to(tl.int64) * sc0 + hd * sc1 + tl.load(pos_ptr + tok).to(tl.int64) * sc2
        c = tl.arange(0, BLOCK_D)
        ok = c < d
        kv = tl.load(k_ptr + b * skb + hd * skh + i * skt + c, mask=ok, other=0.0)
        tl.store(kc_ptr + at + c, kv.to(kc_ptr.dtype.element_ty), mask=ok)
        vv = tl.load(v_ptr + b * svb + hd * svh + i * svt + c, mask=ok, other=0.0)
        tl.store(vc_ptr + at + c, vv.to(vc_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, weight.dtype)


def _add_rms_norm_fwd(h, delta, weight, eps):
    rows = _rows(h)
    n, d = rows.shape
    out = torch.empty(n, d, dtype=_norm_dtype(h, weight), device=h.device)
    res = rows if delta is None else _rows(delta.to(h.dtype))
    s = out if delta is None else torch.empty(n, d, dtype=h.dtype, device=h.device)
    if n:
        _add_rms_norm_kernel[(n,)](
            rows, res, weight.contiguous(), s, out, d, rows.stride(0), res.stride(0), eps,
            HAS_RES=delta is not None, BLOCK=min(ROW_BLOCK, triton.next_power_of_2(d)),
        )  # fmt: skip
    if delta is None:
        return out.reshape(h.shape)
    return s.reshape(h.shape), out.reshape(h.shape)


class _AddRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, delta, weight, eps):
        out = _add_rms_norm_fwd(h, delta, weight, eps)
        ctx.save_for_backward(h if delta is None else out[0], weight)
        ctx.eps, ctx.delta_dtype = eps, None if delta is None else delta.dtype
        return out

    @staticmethod
    def backward(ctx, *grads):
        s, weight = ctx.saved_tensors
        gs, gy = (None, grads[0]) if ctx.delta_dtype is None else grads
        gx, gw = fg.rms_norm_bwd(s, weight, ctx.eps, gy, gs)
        gd = None if ctx.delta_dtype is None else gx.to(ctx.delta_dtype)
        return gx, gd, gw, None


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """`layers.RMSNorm` of ``s = h + delta`` (rounded to h's dtype first); returns ``(s, weight * norm(s))``,
    or with ``delta`` None only the normed ``h``. h/delta ``[..., D]``, weight ``[D]``."""
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (h, delta, weight)):
        return _AddRmsNorm.apply(h, delta, weight, eps)
    return _add_rms_norm_fwd(h, delta, weight, eps)


def _tables(x, cos, sin):
    """cos/sin ``[B*T, D]`` in x's dtype, contiguous."""
    b, t, _, d = x.shape
    return tuple(c.to(x.dtype).expand(b, t, d).reshape(b * t, d).contiguous() for c in (cos, sin))


def _rope_fwd(x, weight, cos, sin, eps):
    """x ``[B, T, heads, D]``, cos/sin from `_tables`."""
    b, t, heads, d = x.shape
    rows = x.reshape(b * t, heads, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(b, t, heads, d, dtype=x.dtype, device=x.device)
    if b * t:
        w = rows if weight is None else weight.contiguous()
        _rope_kernel[(b * t, heads)](
            rows, w, cos, sin, out, heads, d // 2, rows.stride(0), rows.stride(1), eps,
            NORM=weight is not None, BLOCK=max(16, triton.next_power_of_2(d // 2)),
        )  # fmt: skip
    return out.transpose(1, 2)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return _rope_fwd(x, weight, cos, sin, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, sin = ctx.saved_tensors
        gx, gw = fg.rope_bwd(grad, x, weight, cos, sin, ctx.eps)
        return gx, gw, None, None, None


def rope(x: torch.Tensor, weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """``apply_rope(norm(x).transpose(1, 2), cos, sin)`` for x ``[B, T, heads, D]`` (a projection's view),
    norm the per-head `layers.RMSNorm` with ``weight [D]`` (None: no norm), cos/sin ``[B, T, D]``.
    Returns ``[B, heads, T, D]`` in x's dtype (a transposed view of a ``[B, T, heads, D]`` tensor)."""
    if x.shape[-1] % 2:
        raise ValueError(f"rope needs an even head size, got {x.shape[-1]}")
    cos, sin = _tables(x, cos, sin)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _Rope.apply(x, weight, cos, sin, eps)
    return _rope_fwd(x, weight, cos, sin, eps)


def _silu_mul_fwd(g, u, shape, sx):
    """SwiGLU of gate/up views whose element (row, col) lies at ``row * sx + col``; out ``shape``."""
    out = torch.empty(shape, dtype=g.dtype, device=g.device)
    if out.numel():
        grid = (triton.cdiv(out.numel(), ELEM_BLOCK),)
        _silu_mul_kernel[grid](g, u, out, out.numel(), shape[-1], sx, BLOCK=ELEM_BLOCK)
    return out


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _silu_mul_fwd(gate, up, gate.shape, gate.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        gg, gu = torch.empty_like(gate), torch.empty_like(up)
        fg.silu_mul_bwd(grad, gate, up, gg, gu, gate.shape[-1])
        return gg, gu


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate / (1 + exp(-gate)) * up`` (gate and up of one shape and dtype), rounded after each op."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return _silu_mul_fwd(gate.contiguous(), up.contiguous(), gate.shape, gate.shape[-1])


class _Swiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        i = h.shape[1] // 2
        return _silu_mul_fwd(h, h[:, i:], (h.shape[0], i), h.stride(0))

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        i, gh = h.shape[1] // 2, torch.empty_like(h)
        fg.silu_mul_bwd(grad, h, h[:, i:], gh, gh[:, i:], i)
        return gh


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """`silu_mul` of the halves of ``h [M, 2I]`` (gate columns first), read in place: ``[M, I]``."""
    h = h if h.stride(-1) == 1 and h.stride(0) == h.shape[1] else h.contiguous()
    if torch.is_grad_enabled() and h.requires_grad:
        return _Swiglu.apply(h)
    return _silu_mul_fwd(h, h[:, h.shape[1] // 2 :], (h.shape[0], h.shape[1] // 2), h.stride(0))


def _combine_fwd(ys, dest, weight):
    n, k = weight.shape
    hidden = ys.shape[-1]
    ys = ys if ys.stride(-1) == 1 and ys.stride(0) == hidden else ys.contiguous()
    out = torch.empty(n, hidden, dtype=ys.dtype, device=ys.device)
    if n:
        block = min(ROW_BLOCK, triton.next_power_of_2(hidden))
        grid = (n, triton.cdiv(hidden, block))
        _combine_kernel[grid](ys, dest.contiguous(), weight.contiguous(), out, hidden, K=k, BLOCK=block)
    return out


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, dest, weight):
        ys, dest, weight = ys.contiguous(), dest.contiguous(), weight.contiguous()
        ctx.save_for_backward(ys, dest, weight)
        return _combine_fwd(ys, dest, weight)

    @staticmethod
    def backward(ctx, grad):
        ys, dest, weight = ctx.saved_tensors
        gys, gw = fg.combine_bwd(grad, ys, dest, weight)
        return gys, None, gw


def combine(ys: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_j weight[t, j] * ys[dest[t k + j]]`` -> ``[N, H]`` in ys' dtype, added left to right.

    :param ys: ``[N k, H]`` expert outputs of the sorted token copies; ``dest`` int ``[N k]``: the sorted
        row of each copy (`moe.expert_order`); ``weight [N, k]`` the routing weights (cast to ys' dtype)."""
    if torch.is_grad_enabled() and (ys.requires_grad or weight.requires_grad):
        return _Combine.apply(ys, dest, weight)
    return _combine_fwd(ys, dest, weight)


def cache_write(k, v, kc, vc, slots, pos) -> None:
    """``kc[slots[b], :, pos[b, i]] = k[b, :, i]`` (and v into vc) in one launch: k/v ``[B, Hkv, T, D]``
    (any strides, last dim contiguous), kc/vc ``[S, Hkv, L, D]`` (last dim contiguous), slots long ``[B]``,
    pos long ``[B, T]``."""
    b, hkv, t, d = k.shape
    k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    if kc.stride(-1) != 1 or vc.stride() != kc.stride():
        raise ValueError("cache_write needs K and V caches of one layout with contiguous rows")
    if b * t:
        _cache_write_kernel[(b * t, hkv)](
            k, v, kc, vc, slots.contiguous(), pos.contiguous(), t, d, k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )  # fmt: skip
