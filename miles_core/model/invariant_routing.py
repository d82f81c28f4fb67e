"""The MoE router's kernels in ``--true-on-policy-mode`` on CUDA: softmax, top-k, renormalisation and the
ordering of token copies by expert, fused (see `invariant_fused` for why and how they stay invariant).

- `route`: per token, the fp32 softmax over the E router logits, the k largest (largest first, the lower
  expert first on a tie) and their weights renormalised by a left-to-right sum, in one program a row;
- `normalize_topk`: the renormalisation alone (routing replay picks the experts elsewhere);
- `expert_order`: for a decode step's few token copies, `moe.expert_order`, `moe.expert_bounds` and each
  sorted copy's token in one launch (integers: the same permutation).

`route` and `normalize_topk` get torch's gradient of the same function recomputed (``[N, E]`` and
``[N, k]``: tiny); `expert_order` is integer bookkeeping without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miles_core.model.invariant_fused import _pin
from miles_core.model.invariant_kernels import _grad_wrap, tl, triton

__all__ = ["ORDER_MAX", "expert_order", "normalize_topk", "route"]

TOPK_ROWS = 64  # rows per program of `normalize_topk`
ORDER_MAX = 1024  # token copies up to which `expert_order` runs as one program

if triton is not None:

    @triton.jit(**_pin("x_ptr", "probs_ptr", "idx_ptr", "w_ptr", ints=("e",)))
    def _route_kernel(x_ptr, probs_ptr, idx_ptr, w_ptr, e, K: tl.constexpr, NORM: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_E)
        ok = c < e
        x = tl.load(x_ptr + row * e + c, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))  # 0 past E
        p = p / tl.sum(p, axis=0)
        tl.store(probs_ptr + row * e + c, p, mask=ok)
        rest = tl.where(ok, p, -1.0)
        kk = tl.arange(0, BLOCK_K)
        vals = tl.zeros((BLOCK_K,), dtype=tl.float32)
        top = tl.max(rest, axis=0)
        total = top
        for j in tl.static_range(K):
            top = tl.max(rest, axis=0)
            pick = tl.argmax(rest, axis=0, tie_break_left=True)  # the lower expert on a tie
            tl.store(idx_ptr + row * K + j, pick.to(tl.int64))
            vals = tl.where(kk == j, top, vals)
            if j > 0:
                total = total + top  # left to right, largest first
            rest = tl.where(c == pick, -1.0, rest)
        if NORM:
            vals = vals / total
        tl.store(w_ptr + row * K + kk, vals.to(w_ptr.dtype.element_ty), mask=kk < K)

    @triton.jit(**_pin("w_ptr", "out_ptr", ints=("n",)))
    def _topk_norm_kernel(w_ptr, out_ptr, n, K: tl.constexpr, BLOCK: tl.constexpr):
        """Each row of w [n, K] (fp32) over its left-to-right sum; a lane per row."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < n
        total = tl.load(w_ptr + rows * K, mask=ok, other=1.0).to(tl.float32)
        for j in tl.static_range(1, K):
            total = total + tl.load(w_ptr + rows * K + j, mask=ok, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            wj = tl.load(w_ptr + rows * K + j, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows * K + j, (wj / total).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit(**_pin("flat_ptr", "order_ptr", "dest_ptr", "src_ptr", "bounds_ptr", ints=("m", "k", "e")))
    def _expert_order_kernel(flat_ptr, order_ptr, dest_ptr, src_ptr, bounds_ptr, m, k, e,
                             BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        """One program: copy i goes to dest[i] = #copies of a lower expert + #earlier copies of its own."""
        i = tl.arange(0, BLOCK_M)
        ok = i < m
        f = tl.load(flat_ptr + i, mask=ok, other=0)
        ids = tl.arange(0, BLOCK_E)
        rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
        below = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for j0 in range(0, m, CHUNK):
            j = j0 + tl.arange(0, CHUNK)
            j_ok = j < m
            fj = tl.load(flat_ptr + j, mask=j_ok, other=0)
            ahead = (fj[None, :] < f[:, None]) | ((fj[None, :] == f[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((ahead & j_ok[None, :]).to(tl.int32), axis=1)
            below += tl.sum(((fj[None, :] < ids[:, None]) & j_ok[None, :]).to(tl.int32), axis=1)
        tl.store(dest_ptr + i, rank.to(tl.int64), mask=ok)
        tl.store(order_ptr + rank, i.to(tl.int64), mask=ok)
        tl.store(src_ptr + rank, i // k, mask=ok)
        tl.store(bounds_ptr + ids, below, mask=ids <= e)


def _topk_fwd(w, dtype):
    w = w.contiguous()
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    if n:
        _topk_norm_kernel[(triton.cdiv(n, TOPK_ROWS),)](w, out, n, K=k, BLOCK=TOPK_ROWS)
    return out


def _topk_ref(w, dtype):
    total = w[:, :1]
    for j in range(1, w.shape[1]):
        total = total + w[:, j : j + 1]
    return (w / total).to(dtype)


def normalize_topk(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(w / w.sum(-1)).to(dtype)`` for the router's top-k weights ``w [N, k]`` (fp32), the sum added
    left to right."""
    return _grad_wrap(_topk_fwd, _topk_ref, w, dtype)


def expert_order(flat: torch.Tensor, num_experts: int, k: int):
    """``(order, dest, src, bounds)`` of the expert ids ``flat [M]`` (M <= `ORDER_MAX`): `moe.expert_order`'s
    permutation and inverse (long), ``src = order // k`` (int32: each sorted copy's token) and
    `moe.expert_bounds` (int32 ``[E + 1]``), from one launch."""
    m = flat.numel()
    if not 0 < m <= ORDER_MAX:
        raise ValueError(f"expert_order runs one program over 1..{ORDER_MAX} token copies, got {m}")
    flat = flat.contiguous()
    order, dest = (torch.empty(m, dtype=torch.long, device=flat.device) for _ in range(2))
    src = torch.empty(m, dtype=torch.int32, device=flat.device)
    bounds = torch.empty(num_experts + 1, dtype=torch.int32, device=flat.device)
    _expert_order_kernel[(1,)](
        flat, order, dest, src, bounds, m, k, num_experts, BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_E=max(16, triton.next_power_of_2(num_experts + 1)), CHUNK=16,
    )  # fmt: skip
    return order, dest, src, bounds


def _route_fwd(logits, k, norm, dtype):
    x = logits.contiguous()
    n, e = x.shape
    probs = torch.empty(n, e, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    w = torch.empty(n, k, dtype=dtype, device=x.device)
    if n:
        _route_kernel[(n,)](
            x, probs, idx, w, e, K=k, NORM=norm, BLOCK_E=max(16, triton.next_power_of_2(e)),
            BLOCK_K=max(2, triton.next_power_of_2(k)),
        )  # fmt: skip
    return probs, idx, w


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, norm, dtype):
        probs, idx, w = _route_fwd(logits, k, norm, dtype)
        ctx.save_for_backward(logits, idx)
        ctx.norm, ctx.dtype = norm, dtype
        ctx.mark_non_differentiable(idx)
        return probs, idx, w

    @staticmethod
    def backward(ctx, g_probs, g_idx, g_w):
        logits, idx = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            probs = F.softmax(x.float(), dim=-1)
            w = probs.gather(1, idx)
            w = _topk_ref(w, ctx.dtype) if ctx.norm else w.to(ctx.dtype)
            (gx,) = torch.autograd.grad([probs, w], [x], [g_probs, g_w])
        return gx, None, None, None


def route(logits: torch.Tensor, k: int, norm: bool, dtype: torch.dtype):
    """``(probs, idx, w)`` of router logits ``[N, E]``: fp32 ``softmax``, the k largest (long ``[N, k]``,
    largest first, the lower expert on a tie, as `moe._topk`) and their probabilities, renormalised to sum
    to 1 with ``norm`` (`normalize_topk`), in ``dtype``."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _Route.apply(logits, k, norm, dtype)
    return _route_fwd(logits, k, norm, dtype)
