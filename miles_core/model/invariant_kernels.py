"""Triton kernels behind `batch_invariant` on CUDA: each token's result has one reduction order, whatever
the number of rows, the batch composition or the call it arrives in.

cuBLAS picks its tiles and split-K from the shapes, SDPA and the decode kernel visit keys in other blocks
for one decode step than for a packed sequence, so torch's CUDA ops give a token different last bits in a
rollout than in a training micro-batch. Here:

- `linear`: no split-K, K reduced from 0 upwards in ``BLOCK_K`` steps with an fp32 accumulator (fp32
  inputs: ``ieee`` products, no TF32), rounded once to x's dtype. An output element depends only on its
  row of x and column of the weight, never on which rows shared its tile; the tile sizes are picked by
  shape among candidates that give every row the same bits (`invariant_tiles`, probed per card);
- `experts`: the SwiGLU experts over expert-sorted token copies with the same K order: a static
  grid over (expert, column tile, split), each expert's rows in ``BLOCK_M`` chunks bounded on the device
  (`moe.expert_bounds`), so no host read and CUDA graphs can capture it;
- `attention`: per (sequence, KV head) a tile of query rows (GQA heads folded in) visits fixed blocks of
  ``BLOCK_N`` keys from key 0 up to the tile's last visible key, with an online softmax; a block past a
  query's position adds exact zeros (its scale factor is exactly 1), so a decode query over its KV cache
  and the same query inside a packed training sequence get the same bits;
- `rms_norm`, `token_log_probs`: one program per row, the row reduced in fixed blocks.

Training needs gradients: attention's backward is a Triton kernel of its own (`invariant_attn_grad`),
the other ops' are torch's gradients of the same function (`_TorchGrad`); their order does not matter.
Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests); the interpreter's bf16 products
and casts are not the GPU's, so those tests use fp32.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from miles_core.model import invariant_attn_grad as attn_grad
from miles_core.model import invariant_tiles as tiles

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: `batch_invariant` keeps its torch ops
    triton = None
    tl = None

# Matmul tiles: `invariant_tiles` (picked by shape among candidates the card gives identical rows).
ATTN = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
ROW_BLOCK = 1024  # columns per step of the row kernels
MAX_SPLITS = 16  # programs sharing one expert's rows in `experts`


def available(x: torch.Tensor) -> bool:
    """Whether the kernels serve x: on CUDA with triton, or on CPU in a `TRITON_INTERPRET=1` process."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _cfg(cfg: dict) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":  # pipelining settings mean nothing to the interpreter
        return {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
    return dict(cfg)


def _prec(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


# Under the interpreter ``tl.dot`` is numpy's BLAS matmul, whose rounding depends on a row's place in the
# tile; `_dot` then adds the K products one after another instead (exact for the tests' purpose: the
# kernels' tiling, masks and block order are what they check).
if triton is not None:
    INTERP = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def _dot(a, b, PREC: tl.constexpr, EMULATE: tl.constexpr):
        if EMULATE:
            return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        else:
            return tl.dot(a, b, input_precision=PREC)

    @triton.jit
    def _tile(a_rows, row_ok, w_ptr, cols, n, k, swn, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """fp32 [BLOCK_M, BLOCK_N]: rows (pointers ``a_rows`` [BLOCK_M, 1], contiguous K) times the weight
        rows ``cols`` (``w_ptr + col * swn + kk``), K from 0 in BLOCK_K steps."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        col_ok = cols < n
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k
            a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = col_ok[None, :] & k_ok[:, None]
            w = tl.load(w_ptr + cols[None, :] * swn + kk[:, None], mask=w_mask, other=0.0)
            acc += _dot(a, w, PREC, INTERP)
        return acc

    @triton.jit(do_not_specialize=["m"])
    def _linear_kernel(x_ptr, w_ptr, out_ptr, m, n, k, sxm, swn, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows * n may pass 2^31
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < m
        a_rows = x_ptr + rows[:, None] * sxm
        acc = _tile(a_rows, row_ok, w_ptr, cols, n, k, swn, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = row_ok[:, None] & (cols < n)[None, :]
        tl.store(out_ptr + rows[:, None] * n + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["splits"])
    def _expert_gate_up_kernel(x_ptr, w_ptr, src_ptr, bounds_ptr, act_ptr, hidden, inter, sx, swe, splits,
                               PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):  # fmt: skip
        """act[copy] = silu(gate) * up of the sorted copies of expert ``program_id(0)`` (rounded like the
        torch path: gate and up to x's dtype, then each op of ``g / (1 + exp(-g)) * u``)."""
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        dt = act_ptr.dtype.element_ty
        # The bounds are read on the device (no host sync); program s of the expert takes its chunks
        # s, s + splits, ... (each row is computed by one program, the same way whichever).
        for m0 in range(start + tl.program_id(2) * BLOCK_M, end, splits * BLOCK_M):
            if m0 < end:
                rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                row_ok = rows < end
                src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
                a_rows = x_ptr + src[:, None] * sx
                wg = w_ptr + e * swe
                g = _tile(a_rows, row_ok, wg, cols, inter, hidden, hidden, PREC, BLOCK_M, BLOCK_N, BLOCK_K)
                u = _tile(a_rows, row_ok, wg + inter * hidden, cols, inter, hidden, hidden, PREC, BLOCK_M,
                          BLOCK_N, BLOCK_K)  # fmt: skip
                g = g.to(dt).to(tl.float32)
                u = u.to(dt).to(tl.float32)
                den = (1.0 + tl.exp(-g).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                act = ((g / den).to(dt).to(tl.float32) * u).to(dt)
                mask = row_ok[:, None] & (cols < inter)[None, :]
                tl.store(act_ptr + rows[:, None] * inter + cols[None, :], act, mask=mask)

    @triton.jit(do_not_specialize=["splits"])
    def _expert_down_kernel(a_ptr, w_ptr, bounds_ptr, out_ptr, hidden, inter, swe, splits,
                            PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):  # fmt: skip
        e = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        for m0 in range(start + tl.program_id(2) * BLOCK_M, end, splits * BLOCK_M):
            if m0 < end:
                rows = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
                row_ok = rows < end
                a_rows = a_ptr + rows[:, None] * inter
                acc = _tile(a_rows, row_ok, w_ptr + e * swe, cols, hidden, inter, inter, PREC, BLOCK_M,
                            BLOCK_N, BLOCK_K)  # fmt: skip
                mask = row_ok[:, None] & (cols < hidden)[None, :]
                tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                         mask=mask)  # fmt: skip

    @triton.jit(do_not_specialize=["t", "rows"])  # one compiled kernel for decode (t = 1) and training
    def _attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, lse_ptr, t, rows, rep, hkv, d, sm_scale,
                          sqg, sqh, sqt, skg, skh, skl, svg, svh, svl, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          STORE_LSE: tl.constexpr):  # fmt: skip
        gk = tl.program_id(1)  # (sequence, KV head)
        g = gk // hkv
        kh = gk % hkv
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows ordered (head in group, t)
        r_ok = r < rows
        head = kh * rep + r // t
        ti = r % t
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < d
        pos = tl.load(pos_ptr + g * t + ti, mask=r_ok, other=0)
        q_rows = q_ptr + g * sqg + head * sqh + ti * sqt
        q = tl.load(q_rows[:, None] + dd[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        kb = k_ptr + g * skg + kh * skh
        vb = v_ptr + g * svg + kh * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = tl.max(pos, axis=0) + 1  # the tile's last visible key; every row sees key 0
        for start in range(0, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            k_ok = keys < hi
            k_mask = k_ok[None, :] & d_ok[:, None]
            kt = tl.load(kb + keys[None, :] * skl + dd[:, None], mask=k_mask, other=0.0)
            s = _dot(q, kt, PREC, INTERP) * sm_scale
            s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)  # exactly 1 over a block the row does not see
            p = tl.exp(s - m_new[:, None])  # exact zeros past the row's position
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_mask = k_ok[:, None] & d_ok[None, :]
            vt = tl.load(vb + keys[:, None] * svl + dd[None, :], mask=v_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, PREC, INTERP)
            m_i = m_new
        out = acc / l_i[:, None]
        o_rows = out_ptr + ((g * hkv * rep + head) * t + ti) * d
        tl.store(o_rows[:, None] + dd[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip
        if STORE_LSE:  # fp32 row log-sum-exp for the backward (`invariant_attn_grad`); `out` is unchanged
            tl.store(lse_ptr + (g * hkv * rep + head) * t + ti, m_i + tl.log(l_i), mask=r_ok)

    # Row kernels reduce in their load layout, which Triton picks from the pointers' alignment: pinned.
    @triton.jit(do_not_specialize=["sx"], do_not_specialize_on_alignment=["x_ptr", "out_ptr"])
    def _rms_norm_kernel(x_ptr, out_ptr, d, sx, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + row * sx + c, mask=c < d, other=0.0).to(tl.float32)
            acc += xv * xv
        inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / d + eps)
        for c0 in range(0, d, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + row * sx + c, mask=c < d, other=0.0).to(tl.float32)
            tl.store(out_ptr + row * d + c, xv * inv, mask=c < d)

    @triton.jit(do_not_specialize=["sx"], do_not_specialize_on_alignment=["x_ptr"])
    def _log_prob_kernel(x_ptr, tgt_ptr, out_ptr, v, sx, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        for c0 in range(0, v, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            mx = tl.maximum(mx, tl.load(x_ptr + row * sx + c, mask=c < v, other=float("-inf")).to(tl.float32))
        m = tl.max(mx, axis=0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for c0 in range(0, v, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_ptr + row * sx + c, mask=c < v, other=float("-inf")).to(tl.float32)
            acc += tl.exp(xv - m)
        tgt = tl.load(tgt_ptr + row)
        xt = tl.load(x_ptr + row * sx + tgt).to(tl.float32)
        tl.store(out_ptr + row, xt - m - tl.log(tl.sum(acc, axis=0)))


class _TorchGrad(torch.autograd.Function):
    """``fast(*xs)`` forward; backward: torch's gradient of ``ref(*xs)`` (the same function), recomputed."""

    @staticmethod
    def forward(ctx, fast, ref, *xs):
        ctx.ref = ref
        ctx.save_for_backward(*[x if isinstance(x, torch.Tensor) else None for x in xs])
        ctx.consts = [None if isinstance(x, torch.Tensor) else x for x in xs]
        return fast(*xs)

    @staticmethod
    def backward(ctx, *grads):  # one grad per output (`fast` may return a tuple)
        xs = [c if t is None else t for t, c in zip(ctx.saved_tensors, ctx.consts)]
        need = [i for i, x in enumerate(xs) if isinstance(x, torch.Tensor) and ctx.needs_input_grad[i + 2]]
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(i in need) if isinstance(x, torch.Tensor) else x
                  for i, x in enumerate(xs)]  # fmt: skip
            out = ctx.ref(*xs)
            outs = out if isinstance(out, tuple) else (out,)
            got = torch.autograd.grad(outs, [xs[i] for i in need], grads, allow_unused=True)
        grads: list = [None] * (len(xs) + 2)
        for i, gr in zip(need, got):
            grads[i + 2] = gr
        return tuple(grads)


def _grad_wrap(fast, ref, *xs):
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in xs):
        return _TorchGrad.apply(fast, ref, *xs)
    return fast(*xs)


def _kept(x: torch.Tensor) -> tuple[str, ...]:
    return tiles.kept(x.device, x.dtype, _linear_fwd, _experts_fwd)


def _linear_fwd(x: torch.Tensor, weight: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, n = rows.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        cfg = cfg or tiles.select(m, n, tiles.family(x.dtype), _kept(x))
        c = _cfg(cfg)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _linear_kernel[grid](rows, w, out, m, n, k, rows.stride(0), w.stride(0), PREC=_prec(x.dtype), **c)
    return out.reshape(*x.shape[:-1], n)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _linear_fwd(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        gx = (g @ weight).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = g.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return gx, gw


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (x and weight of one dtype, fp32 or bf16); each row the same bits at any M."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _Linear.apply(x, weight)
    return _linear_fwd(x, weight)


def _experts_fwd(x, src, bounds, gate_up, down, swiglu=None, cfg=None):
    x = x if x.stride(-1) == 1 and x.stride(0) == x.shape[1] else x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    e, two_i, hidden = gate_up.shape
    inter, m = two_i // 2, src.numel()
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    fam, prec, kept = tiles.family(x.dtype), _prec(x.dtype), None if cfg else _kept(x)
    # Tiles from the copies an expert gets on average; programs per expert: about one per BLOCK_M of those
    # rows, at most MAX_SPLITS (a static grid from the copy count alone, so a captured graph replays it).
    c = cfg or tiles.select(m / e, inter, fam, kept, "gate_up")
    splits = max(1, min(MAX_SPLITS, triton.cdiv(m, e * c["BLOCK_M"])))
    _expert_gate_up_kernel[(e, triton.cdiv(inter, c["BLOCK_N"]), splits)](
        x, gate_up, src, bounds, act, hidden, inter, x.stride(0), gate_up.stride(0), splits, PREC=prec,
        **_cfg(c),
    )  # fmt: skip
    c = cfg or tiles.select(m / e, hidden, fam, kept, "down")
    splits = max(1, min(MAX_SPLITS, triton.cdiv(m, e * c["BLOCK_M"])))
    _expert_down_kernel[(e, triton.cdiv(hidden, c["BLOCK_N"]), splits)](
        act, down, bounds, out, hidden, inter, down.stride(0), splits, PREC=prec, **_cfg(c)
    )
    return out


def _swiglu(h: torch.Tensor, inter: int) -> torch.Tensor:
    g, u = h[:, :inter], h[:, inter:]
    return g / (1.0 + torch.exp(-g)) * u


def _experts_ref(x, src, bounds, gate_up, down, swiglu=None):
    """The same function in torch, used for gradients only: bf16 grouped GEMMs on CUDA (no host sync),
    else a per-expert loop over host-read bounds; ``swiglu`` ([M, 2I] -> [M, I]) defaults to torch's."""
    xs, inter, outs = x[src.long()], gate_up.shape[1] // 2, []
    act = swiglu or (lambda h: _swiglu(h, inter))
    if xs.is_cuda and xs.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        offs = bounds[1:].to(torch.int32)
        h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
        return torch._grouped_mm(act(h), down.transpose(1, 2), offs=offs)
    ends = bounds.tolist()
    for e in range(gate_up.shape[0]):
        seg = xs[ends[e] : ends[e + 1]]
        outs.append(F.linear(act(F.linear(seg, gate_up[e])), down[e]))
    return torch.cat(outs)


def experts(x, src, bounds, gate_up, down, swiglu=None) -> torch.Tensor:
    """SwiGLU expert outputs ``[M, H]`` of the expert-sorted token copies (x's dtype).

    :param x: ``[N, H]`` token rows; ``src`` int ``[M]``: the token row of each sorted copy;
        ``bounds`` int32 ``[E + 1]`` (`moe.expert_bounds`); ``gate_up`` ``[E, 2I, H]``;
        ``down`` ``[E, H, I]``.
    Every copy's row is reduced in `linear`'s K order, whichever expert, chunk and tiling it gets;
    the backward's recomputed SwiGLU is ``swiglu`` (``[M, 2I] -> [M, I]``, default torch's ops)."""
    return _grad_wrap(_experts_fwd, _experts_ref, x, src.to(torch.int32), bounds, gate_up, down, swiglu)


def _attention_fwd(q, k, v, q_pos, with_lse=False):
    """out ``[G, H, T, D]``; with_lse: ``(out, lse)``, lse fp32 ``[G, H, T]`` (out's bits the same)."""
    g, h, t, d = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pos = q_pos.to(torch.int32).contiguous()
    out = torch.empty(g, h, t, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(g, h, t, dtype=torch.float32, device=q.device) if with_lse else out
    if g * t:
        grid = (triton.cdiv(rep * t, ATTN["BLOCK_M"]), g * hkv)
        _attention_kernel[grid](
            q, k, v, pos, out, lse, t, rep * t, rep, hkv, d, 1.0 / math.sqrt(d), q.stride(0), q.stride(1),
            q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            PREC=_prec(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(d)), STORE_LSE=with_lse, **_cfg(ATTN),
        )  # fmt: skip
    return (out, lse) if with_lse else out


def _attention_ref(q, k, v, q_pos):
    rep = q.shape[1] // k.shape[1]
    keys = torch.arange(k.shape[2], device=q.device)
    mask = keys <= q_pos[:, None, :, None]  # [G, 1, T, L]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)


def attention(q, k, v, q_pos) -> torch.Tensor:
    """`batch_invariant.attention`: q ``[G, H, T, D]``, k/v ``[G, Hkv, L, D]``, q_pos ``[G, T]``; its
    backward is `invariant_attn_grad`'s kernels (`_attention_ref`: the same function in torch)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return attn_grad.Attention.apply(_attention_fwd, q, k, v, q_pos)
    return _attention_fwd(q, k, v, q_pos)


def _rms_norm_fwd(x, eps):
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), eps, BLOCK=ROW_BLOCK)
    return out.reshape(x.shape)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 ``x * rsqrt(mean(x^2) + eps)`` over the last dim, one program per row."""
    return _grad_wrap(_rms_norm_fwd, lambda a, e: F.rms_norm(a.float(), (a.shape[-1],), eps=e), x, eps)


def _log_probs_fwd(logits, targets):
    rows = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    if rows.shape[0]:
        tgt = targets.to(torch.int64).contiguous()
        _log_prob_kernel[(rows.shape[0],)](rows, tgt, out, rows.shape[1], rows.stride(0), BLOCK=ROW_BLOCK)
    return out


def _log_probs_ref(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.long()[:, None])[:, 0]


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]``: log-softmax of each row of ``logits [N, V]`` (read in fp32) at ``targets``."""
    return _grad_wrap(_log_probs_fwd, _log_probs_ref, logits, targets)
