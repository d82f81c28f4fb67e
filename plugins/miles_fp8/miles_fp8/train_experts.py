"""Unified-FP8 training of the blockwise experts: the forward on the grouped Triton kernels, the backward
as grouped GEMMs (issue #21 item 3).

`Fp8Experts` in training mode (policy with grad, reference model without) runs the same two kernels as the
rollout engine (`miles_fp8.triton_experts`) on the master weights quantized per forward, instead of one
emulated or dense GEMM per expert: the forward numbers are the rollout's, kernel for kernel. The backward
is the straight-through estimator of that forward: with ``G``, ``U`` the gate / up outputs (rounded to x's
dtype, saved by the kernel side by side as ``h = [G | U]``), ``a = silu(G) * U`` the SwiGLU output and
``deq`` the dequantized FP8 operands of the forward,

    dA = dy @ deq(Wd)                      dWd = dy^T @ deq(quant(a))
    dG = dA * U * silu'(G), dU = dA * silu(G)
    dx += dG @ deq(Wg) + dU @ deq(Wu)      dWg = dG^T @ deq(quant(x)), dWu = dU^T @ deq(quant(x))

per expert over its sorted token copies. `grouped_backward` (CUDA, bf16: the --bf16 trainer) computes
it as the bf16 trainer's backward does: ``torch._grouped_mm`` over the expert-sorted copies (one call for
each of dA, dx, dWd and [dWg | dWu]; fp32 accumulation, bf16 results), the weights dequantized to bf16
once per backward, the core's one-pass SwiGLU backward, no host sync. `looped_backward` (elsewhere: fp32,
CPU) runs one expert at a time in fp32 after one host read of the expert bounds.
"""

from __future__ import annotations

import torch

from miles_core.api import combine_copies, expert_bounds, expert_order, swiglu_backward
from miles_fp8 import triton_experts
from miles_fp8.dequant import dequantize_as, dequantize_into
from miles_fp8.quant import Recipe, dequantize, quantize, quantize_dequantize


def grouped_ok(x: torch.Tensor, inter: int, hidden: int) -> bool:
    """Whether the backward runs as grouped GEMMs: bf16 on CUDA where ``torch._grouped_mm`` exists and
    the rows are 16-byte aligned (its layout rule); else the fp32 per-expert loop."""
    aligned = inter % 8 == 0 and hidden % 8 == 0
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and aligned


def _qdq(t: torch.Tensor, tile: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``quantize_dequantize(t, tile)`` rounded to ``dtype`` (on CUDA: the fused quantize and dequantize
    kernels, the same values)."""
    if t.is_cuda:
        return dequantize_as(*quantize(t, tile, fast=True), tile, dtype)
    return quantize_dequantize(t, tile).to(dtype)


def _zeros(x, weights, needs, dtype):
    num_experts, inter, hidden = weights[0].shape
    shapes = (x.shape, (num_experts, 2 * inter, hidden), weights[2].shape)
    return tuple(x.new_zeros(s, dtype=dtype) if need else None for s, need in zip(shapes, needs))


def grouped_backward(dys, x, act, h, src, dest, bounds, weights, recipe: Recipe, needs=(True, True, True)):
    """The STE backward (module docstring) as grouped GEMMs in x's dtype (bf16; fp32 in the CPU tests).

    :param dys: ``[M, H]`` gradient of the expert outputs in sorted copy order; ``x`` ``[N, H]`` tokens;
        ``act`` ``[M, I]`` SwiGLU outputs; ``h`` ``[M, 2I]`` = [gate | up] outputs (all from the forward).
    :param src: int ``[M]`` token row of each sorted copy; ``dest`` long ``[N k]``: sorted row of each copy
        (`expert_order`); ``bounds`` int32 ``[E + 1]`` (`expert_bounds`).
    :param weights: ``(gate, up, down, gate_scale, up_scale, down_scale)``, e4m3 codes and fp32 scales.
    :param needs: which of (dx, d_gate_up, d_down) to compute (the others are None).
    :returns: ``(dx [N, H], d_gate_up [E, 2I, H], d_down [E, H, I])`` in x's dtype.
    """
    gq, uq, dq, gs, us, ds = weights
    num_experts, inter, hidden = gq.shape
    wt, at, dt = recipe.weight_tile, recipe.act_tile, x.dtype
    m, n = src.numel(), x.shape[0]
    if m == 0:  # torch._grouped_mm takes no empty contraction
        return _zeros(x, weights, needs, dt)
    offs = bounds[1:].to(torch.int32).contiguous()
    dy = dys.to(dt).contiguous()
    dx = d_gate_up = d_down = None
    if needs[2]:
        d_down = torch._grouped_mm(dy.t(), _qdq(act, at, dt), offs=offs)  # [E, H, I]
    if not (needs[0] or needs[1]):
        return dx, d_gate_up, d_down
    d_act = torch._grouped_mm(dy, dequantize_as(dq, ds, wt, dt), offs=offs)  # [M, I]
    d_h = swiglu_backward(h, d_act)  # [M, 2I]: [dG | dU], fp32 inside, one pass
    del d_act
    if needs[0]:
        w_gu = torch.empty(num_experts, 2 * inter, hidden, dtype=dt, device=x.device)
        dequantize_into(gq, gs, wt, w_gu[:, :inter])
        dequantize_into(uq, us, wt, w_gu[:, inter:])
        d_copies = torch._grouped_mm(d_h, w_gu, offs=offs)  # [M, H]
        del w_gu
        # Each token's k copy gradients gathered and added in fp32 (no atomics), as `dispatch_copies`.
        dx = d_copies[dest].view(n, m // max(n, 1), hidden).sum(1, dtype=torch.float32).to(dt)
        del d_copies
    if needs[1]:
        xe = _qdq(x, at, dt)[src.long()]  # quantized per token row: the same values as per copy
        d_gate_up = torch._grouped_mm(d_h.t(), xe, offs=offs)  # [E, 2I, H]
    return dx, d_gate_up, d_down


def looped_backward(dys, x, act, h, src, dest, bounds, weights, recipe: Recipe, needs=(True, True, True)):
    """`grouped_backward` one expert at a time in fp32 (one host read of ``bounds``), results in fp32: the
    same operations on the same values, so in fp32 the two agree bit for bit where the grouped GEMM sums
    like ``@`` (torch's CPU fallback does)."""
    gq, uq, dq, gs, us, ds = weights
    wt, at, f32 = recipe.weight_tile, recipe.act_tile, torch.float32
    num_experts, inter, hidden = gq.shape
    m, n, src = src.numel(), x.shape[0], src.long()
    if m == 0:
        return _zeros(x, weights, needs, f32)
    d_copies = torch.zeros(m, hidden, dtype=f32, device=x.device)
    d_gate_up = torch.zeros(num_experts, 2 * inter, hidden, dtype=f32, device=x.device)
    d_down = torch.zeros(dq.shape, dtype=f32, device=x.device)
    xe, ae = quantize_dequantize(x, at), quantize_dequantize(act, at)  # per row: the same values per copy
    ends = bounds.tolist()
    for e in range(num_experts):
        a, b = ends[e], ends[e + 1]
        if a == b:
            continue
        dy = dys[a:b].float()
        d_down[e] = dy.t() @ ae[a:b]
        d_h = swiglu_backward(h[a:b].float(), dy @ dequantize(dq[e], ds[e], wt))  # [dG | dU]
        d_copies[a:b] = d_h @ torch.cat([dequantize(gq[e], gs[e], wt), dequantize(uq[e], us[e], wt)])
        d_gate_up[e] = d_h.t() @ xe[src[a:b]]
    dx = d_copies[dest].view(n, m // max(n, 1), hidden).sum(1)
    return tuple(t if need else None for t, need in zip((dx, d_gate_up, d_down), needs))


class _GroupedFp8Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, src, dest, bounds, prep, recipe):
        (gq, gs, _), (uq, us, _), (dq, ds, _) = (prep[k] for k in ("gate_proj", "up_proj", "down_proj"))
        out, act, h = triton_experts.fp8_experts_saving(x, src, bounds, gq, uq, dq, gs, us, ds, True)
        ctx.save_for_backward(x, act, h, src, dest, bounds, gq, uq, dq, gs, us, ds)
        ctx.recipe, ctx.dtypes = recipe, (x.dtype, gate_up.dtype, down.dtype)
        return out

    @staticmethod
    def backward(ctx, dys: torch.Tensor):
        x, act, h, src, dest, bounds, *weights = ctx.saved_tensors
        inter, hidden = weights[0].shape[1:]
        run = grouped_backward if grouped_ok(x, inter, hidden) else looped_backward
        grads = run(dys, x, act, h, src, dest, bounds, weights, ctx.recipe, ctx.needs_input_grad[:3])
        grads = tuple(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
        return *grads, None, None, None, None, None


def grouped_forward(mod, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """`Fp8Experts.forward` of a training-mode module on the grouped kernels (see the module docstring)."""
    n, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order, dest = expert_order(flat, mod.num_experts)
    src, bounds = (order // k).to(torch.int32), expert_bounds(flat, mod.num_experts)
    prep = mod._prepare(x.device, fp32=False)  # quantized weights; the backward dequantizes them to x's dtype
    params = (mod.gate_up_proj, mod.down_proj)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        ys = _GroupedFp8Experts.apply(x, *params, src, dest, bounds, prep, mod.recipe)
    else:
        (gq, gs, _), (uq, us, _), (dq, ds, _) = (prep[k] for k in ("gate_proj", "up_proj", "down_proj"))
        ys = triton_experts.fp8_experts(x, src, bounds, gq, uq, dq, gs, us, ds)
    return combine_copies(ys, order, dest, topk_weight, x.dtype)
