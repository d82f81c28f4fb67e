"""Batch-invariant ops of ``--true-on-policy-mode``: a token's result never depends on its neighbours.

The engine computes a token in a prefill of a few prompts or in a decode step of a varying batch; the
trainer computes it again in a padded or packed micro-batch. Plain kernels pick their reduction order from
the shapes (BLAS picks a kernel by the number of rows, SDPA reduces over however many keys the call has,
the elementwise loop rounds ``sigmoid`` differently in its vector body and its scalar tail), so the same
token's log-prob differs in the last bits. Each op here fixes the order per row:

- `linear`: rows are multiplied in chunks of exactly `ROW_CHUNK` rows, the last one padded, one BLAS call
  a chunk. Every call then has the same shape, so BLAS picks the same kernel and splits it over threads
  the same way whatever the number of rows (padding to a multiple of 8 rows alone was not enough: MKL
  takes another kernel for 8 rows than for more at K >= 192, and splits small-M products differently
  over 2 threads at K >= 1024). Checked for 1..1100 rows, K up to 2048, on 1 and 2 threads by
  ``tests/test_batch_invariant.py``, and up to 3000 rows by hand; the bias is added after the product;
- `silu_mul`: ``x / (1 + exp(-x)) * y`` from ops that round each element alike wherever it lies;
- `attention`: each query's scores against fixed blocks of `KEY_BLOCK` keys (batched matmuls whose query
  rows are padded to a multiple of `ROW_TILE`), one max over its visible keys, and the softmax sums and
  weighted values accumulated block after block from key 0. Blocks past a query's position add exact
  zeros, so one query over its KV cache (decode) and the same query in a packed training sequence get the
  same bits;
- `combine`: the k weighted expert outputs of a token summed in routing order (a left fold);
- `token_log_probs`: ``log_softmax`` of each fp32 row at the target, the one formula the sampler and the
  trainer share.

RMSNorm (``F.rms_norm``), softmax, ``exp`` and rope's ``cos``/``sin`` are batch-invariant on CPU as they are.
The bodies below are the CPU (fp32) implementations. On CUDA (with triton) `linear`, `attention`,
`rms_norm`, `token_log_probs` and the MoE experts run the fixed-order Triton kernels of
`miles_core.model.invariant_kernels` instead (fp32 and bf16), and the model calls the fused kernels of
`invariant_fused` / `invariant_routing` in place of `silu_mul`, `combine`, `row_sum`, rope, the residual
adds and the router's small ops.
`make_batch_invariant` switches a built model to these functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.model import invariant_kernels as ik

ROW_TILE = 8  # query rows of `attention`'s products are padded to a multiple of this
ROW_CHUNK = 32  # `linear` multiplies its rows in chunks of exactly this many (the last one padded)
KEY_BLOCK = 32  # keys per block in `attention`


def _chunked_mm(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``rows [M, K]`` (contiguous, M a multiple of `ROW_CHUNK`) ``@ weight.T``, one ``torch.mm`` a chunk."""
    m, k, n = rows.shape[0], rows.shape[1], weight.shape[0]
    out = rows.new_empty(m, n)
    wt = weight.t()
    for chunk, dest in zip(rows.view(-1, ROW_CHUNK, k).unbind(0), out.view(-1, ROW_CHUNK, n).unbind(0)):
        torch.mm(chunk, wt, out=dest)
    return out


class _ChunkedMatmul(torch.autograd.Function):
    """``rows @ weight.T`` for ``rows [M, K]``, M a multiple of `ROW_CHUNK`: one BLAS call per chunk of
    rows, every call the same shape, so the same kernel and thread split whatever M is. The backward (whose
    bits the mode does not fix) is two plain products."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, weight)
        return _chunked_mm(rows, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        rows, weight = ctx.saved_tensors
        d_rows = grad @ weight if ctx.needs_input_grad[0] else None
        d_weight = grad.t() @ rows if ctx.needs_input_grad[1] else None
        return d_rows, d_weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for ``x [..., K]``, each row's result independent of the number of rows."""
    if ik.available(x):
        out = ik.linear(x.to(weight.dtype), weight)
        return out if bias is None else out + bias
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    pad = -m % ROW_CHUNK
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    grad = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    out = _ChunkedMatmul.apply(rows, weight) if grad else _chunked_mm(rows, weight)
    if pad:
        out = out[:m]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class InvariantLinear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` (same parameters, names and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, rounded alike for every element (``F.silu`` rounds its scalar tail otherwise)."""
    return gate / (1.0 + torch.exp(-gate)) * up


def combine(ys: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_j weight[:, j] * ys[:, j]`` for ``ys [N, k, H]``, ``weight [N, k]``, added left to right."""
    w = weight.to(ys.dtype)
    out = ys[:, 0] * w[:, :1]
    for j in range(1, ys.shape[1]):
        out = out + ys[:, j] * w[:, j : j + 1]
    return out


def row_sum(x: torch.Tensor) -> torch.Tensor:
    """``x.sum(-1, keepdim=True)`` for a few columns (router weights), added left to right."""
    out = x[..., :1]
    for j in range(1, x.shape[-1]):
        out = out + x[..., j : j + 1]
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query attention with a fixed per-query reduction order.

    :param q: ``[G, H, T, D]`` queries (after norm and rope).
    :param k: ``[G, Hkv, L, D]`` keys of the same G sequences (``v`` likewise); any strides.
    :param q_pos: long ``[G, T]``: the position of each query; it sees keys ``0..q_pos`` (< L) of its row.
    :returns: ``[G, H, T, D]`` in q's dtype.

    Each (sequence, KV head) is one matrix of the batched products: its ``rep * T`` query rows padded to a
    multiple of `ROW_TILE` times one contiguous block of keys, then the probabilities
    times that block's values.
    """
    if ik.available(q):
        return ik.attention(q, k, v, q_pos)
    g, h, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    rows = h // hkv * t
    blocks = -(-length // KEY_BLOCK)
    pad = blocks * KEY_BLOCK - length
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    qs = (q * (1.0 / math.sqrt(d))).reshape(g * hkv, rows, d)  # rows ordered (rep, T)
    pad_rows = -rows % ROW_TILE  # only the two products see the padding rows
    qs = F.pad(qs, (0, 0, 0, pad_rows))
    pos = q_pos[:, None, None, :].expand(g, hkv, h // hkv, t).reshape(g * hkv, rows, 1)
    cols = torch.arange(KEY_BLOCK, device=q.device)
    scores, m = [], None
    for j in range(blocks):
        blk = slice(j * KEY_BLOCK, (j + 1) * KEY_BLOCK)
        kt = k[:, :, blk].reshape(g * hkv, KEY_BLOCK, d).transpose(1, 2).contiguous()  # [GHkv, D, B]
        s = torch.bmm(qs, kt)[:, :rows].masked_fill(cols + j * KEY_BLOCK > pos, float("-inf"))
        scores.append(s)  # [GHkv, R, B]
        top = s.amax(-1)
        m = top if m is None else torch.maximum(m, top)
    denom = acc = None
    for j, s in enumerate(scores):
        p = torch.exp(s - m[..., None])  # 0 past the query's position, so later blocks add exact zeros
        vj = v[:, :, j * KEY_BLOCK : (j + 1) * KEY_BLOCK].reshape(g * hkv, KEY_BLOCK, d).contiguous()
        part_l, part = p.sum(-1), torch.bmm(F.pad(p, (0, 0, 0, pad_rows)), vj)[:, :rows]
        denom = part_l if denom is None else denom + part_l
        acc = part if acc is None else acc + part
    return (acc / denom[..., None]).reshape(g, h, t, d)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 ``x * rsqrt(mean(x^2) + eps)`` over the last dim (on CPU ``F.rms_norm`` reduces rows alone)."""
    if ik.available(x):
        return ik.rms_norm(x, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]``: ``log_softmax`` of each row of ``logits [N, V]`` (in fp32) at ``targets [N]``.

    The engine's sampler reports its log-probs with this function and the trainer recomputes them with it
    in ``--true-on-policy-mode``; the softmax kernel reduces each row on its own, whatever N is."""
    if ik.available(logits):  # always fp32 in: the kernel compiled per input dtype could sum in another order
        return ik.token_log_probs(logits.float(), targets)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def make_batch_invariant(model: nn.Module) -> int:
    """Switch a built model to the ops above, in place: every plain `nn.Linear` becomes an
    `InvariantLinear` (the same module object, so tied weights, optimizers and hooks keep it) and every
    module with a ``batch_invariant`` attribute (attention, MLP, RMSNorm, MoE block and experts) turns it on.
    Returns how many modules changed."""
    changed = 0
    for mod in model.modules():
        if type(mod) is nn.Linear:
            mod.__class__ = InvariantLinear  # adds no state: only the forward differs
            changed += 1
        if getattr(mod, "batch_invariant", None) is False:
            mod.batch_invariant = True
            changed += 1
    return changed
