"""Unified-FP8 training forward of the blockwise experts on the grouped Triton kernels (issue #21 item 3).

`Fp8Experts` in training mode (policy with grad, reference model without) runs the same two kernels as the
rollout engine (`miles_fp8.triton_experts`) on the master weights quantized per forward, instead of one
emulated or dense GEMM per expert: the forward numbers are the rollout's, kernel for kernel. The backward
is the per-expert loop's straight-through estimator written out: with ``G``, ``U`` the gate / up outputs
(rounded to x's dtype, saved by the kernel), ``h = silu(G) * U`` and the dequantized FP8 operands,

    dh = dy @ deq(Wd)                      dWd = dy^T @ deq(quant(h))
    dG = dh * U * silu'(G), dU = dh * silu(G)
    dx += dG @ deq(Wg) + dU @ deq(Wu)      dWg = dG^T @ deq(quant(x)), dWu = dU^T @ deq(quant(x))

in fp32, one expert at a time (one host read of the expert bounds; training may sync).
"""

from __future__ import annotations

import torch

from miles_core.api import combine_copies, expert_bounds, expert_order
from miles_fp8 import triton_experts
from miles_fp8.quant import dequantize, quantize_dequantize


class _GroupedFp8Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_up, down, src, bounds, prep, recipe):
        (gq, gs, _), (uq, us, _), (dq, ds, _) = (prep[k] for k in ("gate_proj", "up_proj", "down_proj"))
        out, act, g, u = triton_experts.fp8_experts_saving(x, src, bounds, gq, uq, dq, gs, us, ds, True)
        ctx.save_for_backward(x, act, g, u, src, bounds, gq, uq, dq, gs, us, ds)
        ctx.recipe, ctx.gate_up, ctx.down = recipe, (gate_up.shape, gate_up.dtype), down.dtype
        return out

    @staticmethod
    def backward(ctx, dys: torch.Tensor):
        x, act, g, u, src, bounds, gq, uq, dq, gs, us, ds = ctx.saved_tensors
        wt, at = ctx.recipe.weight_tile, ctx.recipe.act_tile
        num_experts, inter, hidden = gq.shape
        src = src.long()
        d_copies = torch.zeros(src.numel(), hidden, dtype=torch.float32, device=x.device)
        d_gate_up = torch.zeros(ctx.gate_up[0], dtype=ctx.gate_up[1], device=x.device)
        d_down = torch.zeros(dq.shape, dtype=ctx.down, device=x.device)
        ends = bounds.tolist()
        for e in range(num_experts):
            a, b = ends[e], ends[e + 1]
            if a == b:
                continue
            dy = dys[a:b].float()
            dh = dy @ dequantize(dq[e], ds[e], wt)
            d_down[e] = (dy.t() @ quantize_dequantize(act[a:b], at)).to(ctx.down)
            gf, uf = g[a:b].float(), u[a:b].float()
            sig = torch.sigmoid(gf)
            d_g = dh * uf * (sig * (1 + gf * (1 - sig)))
            d_u = dh * (gf * sig)
            d_copies[a:b] = d_g @ dequantize(gq[e], gs[e], wt) + d_u @ dequantize(uq[e], us[e], wt)
            xe = quantize_dequantize(x[src[a:b]], at)
            d_gate_up[e, :inter] = (d_g.t() @ xe).to(d_gate_up.dtype)
            d_gate_up[e, inter:] = (d_u.t() @ xe).to(d_gate_up.dtype)
        dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, src, d_copies)
        return dx.to(x.dtype), d_gate_up, d_down, None, None, None, None


def grouped_forward(mod, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    """`Fp8Experts.forward` of a training-mode module on the grouped kernels (see the module docstring)."""
    n, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order, dest = expert_order(flat, mod.num_experts)
    src, bounds = (order // k).to(torch.int32), expert_bounds(flat, mod.num_experts)
    prep = mod._prepare(x.device, fp32=False)  # quantized weights; the backward dequantizes one at a time
    params = (mod.gate_up_proj, mod.down_proj)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        ys = _GroupedFp8Experts.apply(x, *params, src, bounds, prep, mod.recipe)
    else:
        (gq, gs, _), (uq, us, _), (dq, ds, _) = (prep[k] for k in ("gate_proj", "up_proj", "down_proj"))
        ys = triton_experts.fp8_experts(x, src, bounds, gq, uq, dq, gs, us, ds)
    return combine_copies(ys, order, dest, topk_weight, x.dtype)
