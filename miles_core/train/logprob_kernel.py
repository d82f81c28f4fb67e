"""Triton kernels for the response tokens' log-probs and entropies (``--train-compile`` on CUDA).

`losses.log_probs_and_entropy` needs, per row of ``[N, V]`` logits, the log-softmax at the target and
the softmax entropy, and their gradient. Done with torch ops that is about ten passes over an fp32
copy of each chunk of rows forward and as many backward (~5 ms a step for 16k rows of a 32k vocab on
an H200). Here each direction is one kernel, one program per row:

- forward reads the row once in ``BLOCK_V`` slices with an online softmax: running max ``m``, sum of
  ``exp(x - m)`` and sum of ``exp(x - m) * (x - m)`` (rescaled when the max moves, so the entropy keeps
  its precision for large logits), then writes the target log-prob, the entropy, ``m`` and the
  shifted logsumexp;
- backward reads the row once more and writes its gradient in the logits' dtype.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
CPU tests check them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the chunked torch path serves
    triton = None
    tl = None

BLOCK_V = 2048
NUM_WARPS = 8


def available(logits: torch.Tensor) -> bool:
    """Whether the kernels can run on `logits` (CUDA, or Triton's interpreter on CPU)."""
    if triton is None or logits.dim() != 2:
        return False
    return logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _forward_kernel(
        x_ptr, stride, tgt_ptr, logp_ptr, ent_ptr, max_ptr, lse_ptr, V,
        BLOCK: tl.constexpr, ENTROPY: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        m = tl.full((), -1e30, tl.float32)  # finite: rescaling by exp(m - m_new) never makes 0 * inf
        s = tl.zeros((), tl.float32)
        t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(x - m_new)  # 0 for -inf logits and masked lanes
            if ENTROPY:
                d = tl.where(e > 0, x - m_new, 0.0)
                t = (t + s * (m - m_new)) * alpha + tl.sum(e * d, 0)
            s = s * alpha + tl.sum(e, 0)
            m = m_new
        lse = tl.log(s)
        tgt = tl.load(tgt_ptr + row)
        x_t = tl.load(base + tgt).to(tl.float32)
        tl.store(logp_ptr + row, x_t - m - lse)
        if ENTROPY:
            tl.store(ent_ptr + row, lse - t / s)
        tl.store(max_ptr + row, m)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _backward_kernel(
        x_ptr, stride, g_ptr, g_stride, tgt_ptr, max_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, V,
        BLOCK: tl.constexpr, HAS_LOGP: tl.constexpr, HAS_ENT: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        out = g_ptr + row * g_stride
        m = tl.load(max_ptr + row)
        lse = tl.load(lse_ptr + row)
        tgt = tl.load(tgt_ptr + row)
        gl = tl.load(glogp_ptr + row) if HAS_LOGP else 0.0
        ge = tl.load(gent_ptr + row) if HAS_ENT else 0.0
        mean = lse - tl.load(ent_ptr + row) if HAS_ENT else 0.0  # E_p[x - m]
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            xs = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) - m
            p = tl.exp(xs - lse)
            g = tl.zeros((BLOCK,), tl.float32)
            if HAS_LOGP:  # d logp_t / dx = onehot(t) - softmax
                g = tl.where(cols == tgt, gl, 0.0) - p * gl
            if HAS_ENT:  # dH / dx_j = -p_j * (x_j - E_p[x])
                g -= tl.where(p > 0, (xs - mean) * p, 0.0) * ge
            tl.store(out + cols, g.to(g_ptr.dtype.element_ty), mask=ok)


class FusedLogProbEntropy(torch.autograd.Function):
    """``(log-probs [N], entropies [N or 0])``, float32, of ``[N, V]`` logits at ``targets [N]``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        n, v = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        logp, row_max, lse = (torch.empty(n, **f32) for _ in range(3))
        ent = torch.empty(n if with_entropy else 0, **f32)
        targets = targets.contiguous()
        if n:
            _forward_kernel[(n,)](
                logits, logits.stride(0), targets, logp, ent if with_entropy else logp, row_max, lse, v,
                BLOCK=BLOCK_V, ENTROPY=with_entropy, num_warps=NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(logits, targets, row_max, lse, ent)
        ctx.with_entropy = with_entropy
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, row_max, lse, ent = ctx.saved_tensors
        n, v = logits.shape
        grad = torch.empty_like(logits)
        has_ent = ctx.with_entropy and grad_ent is not None
        if n:
            _backward_kernel[(n,)](
                logits, logits.stride(0), grad, grad.stride(0), targets, row_max, lse,
                ent if has_ent else lse, grad_logp.contiguous() if grad_logp is not None else lse,
                grad_ent.contiguous() if has_ent else lse, v,
                BLOCK=BLOCK_V, HAS_LOGP=grad_logp is not None, HAS_ENT=has_ent, num_warps=NUM_WARPS,
            )  # fmt: skip
        return grad, None, None
