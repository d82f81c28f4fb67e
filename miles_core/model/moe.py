"""Mixture-of-experts block: a top-k softmax router (`gate`) and one fused `Experts` module.

Routing and expert compute are kept apart on purpose: routing replay (R3) only changes which experts are
chosen (through `RoutingState`), while a quantization plugin only replaces the `Experts` module with a
subclass. Neither needs to know about the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.model import batch_invariant, fused_moe, invariant_fused, invariant_routing
from miles_core.model import invariant_kernels as ik
from miles_core.model.swiglu import swiglu


@dataclass
class RoutingState:
    """Route capture and replay for one forward pass.

    After the forward, `router_topk[m]` (long [B, T, k]) is MoE layer m's own top-k choice and `used_topk[m]`
    the experts actually used (equal unless replaying). With `replay`, layer m uses exactly `replay[m]`
    ([B, T, k]) and recomputes the gate weights from the current router, so the router still gets gradient.
    """

    record: bool = True
    replay: list[torch.Tensor] | None = None
    router_topk: list[torch.Tensor] = field(default_factory=list)
    used_topk: list[torch.Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.router_topk, self.used_topk = [], []


def _grouped_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype to run grouped GEMMs in on this input, or None when only the per-expert loop applies.

    Under ``torch.autocast(bfloat16)`` (the trainer's --bf16) the input arrives in fp32 from the fp32
    residual stream; it is cast so the training path also gets the grouped kernel instead of the loop.
    """
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return None
    if x.dtype == torch.bfloat16:
        return torch.bfloat16
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
        return torch.bfloat16
    return None


def _no_sync(x: torch.Tensor, few_rows: bool) -> bool:
    """Whether the experts must run without a host sync: compiling a decode-sized step, or capturing
    a CUDA graph (outside torch.compile, which never traces the capture itself)."""
    if torch.compiler.is_compiling():
        return few_rows
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def expert_order(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, dest): the stable argsort of expert ids `flat` [M] and its inverse (copy i is sorted row
    dest[i]). For few rows (decode) each copy's destination is counted directly, in one fusable
    comparison-and-sum over all pairs of copies, instead of a device radix sort: copy i goes after every
    copy of a lower expert and every earlier copy of its own expert. Both give the same permutation."""
    m = flat.numel()
    i = torch.arange(m, device=flat.device)
    if m * m > (1 << 20):
        order = flat.argsort(stable=True)
        return order, torch.empty_like(order).scatter_(0, order, i)
    a, b = flat[:, None], flat[None, :]  # [M, 1] this copy's expert, [1, M] every other copy's
    dest = ((b < a) | ((b == a) & (i[None, :] < i[:, None]))).sum(1)
    return torch.empty_like(flat).scatter_(0, dest, i), dest


def expert_bounds(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E + 1]: expert e owns sorted copies ``bounds[e] .. bounds[e+1]-1`` of the expert ids
    `flat` [M], counted on the device in one reduction (bincount would sync with the host)."""
    ids = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    return F.pad((flat[None, :] <= ids[:, None]).sum(1, dtype=torch.int32), (1, 0))


def expert_row_block(tokens: int, copies: int, num_experts: int, decode: int, prefill: int) -> int:
    """Rows per expert tile of a grouped expert kernel: ``decode`` while there are at most ``decode`` copies
    an expert on average, counted as ``tokens <= L`` with L a power of two, so that a batch and its
    CUDA-graph padding to the next power of two (capped at the slot count) land on the same side (and so
    run the same tile, the same instruction, the same bits); else ``prefill``."""
    k = max(1, copies // max(tokens, 1))
    limit = 1 << max(0, (decode * num_experts // k).bit_length() - 1)
    return decode if tokens <= limit else prefill


def _topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest of `probs` over the last dim, largest first; equal values rank the lower expert
    first (bf16 router logits tie often, and torch.topk leaves the order of ties open, so the compiled
    and eager paths would route differently). Eagerly a stable sort; under torch.compile (the decode
    step) a ranking that fuses into a couple of small kernels instead of torch's two per layer."""
    if not torch.compiler.is_compiling():
        vals, idx = probs.sort(dim=-1, descending=True, stable=True)
        return vals[..., :k], idx[..., :k]
    e = probs.shape[-1]
    j = torch.arange(e, device=probs.device)
    if probs.shape[0] > 2048:
        # Training / prefill sizes: k rounds of argmax (the first maximum, i.e. the lower expert on a
        # tie) read [N, E] k times; the ranking below compares [N, E, E] (0.9 ms a 49k-token step).
        rest, picks = probs, []
        for _ in range(k):
            picks.append(rest.argmax(-1))
            rest = torch.where(j == picks[-1][..., None], float("-inf"), rest)
        idx = torch.stack(picks, -1)
        return probs.gather(-1, idx), idx
    p, q = probs[..., :, None], probs[..., None, :]  # [N, E, 1] each expert, [N, 1, E] every other
    rank = ((q > p) | ((q == p) & (j < j[:, None]))).sum(-1)  # [N, E]: experts ahead of each one
    slots = torch.arange(k, device=probs.device)
    idx = ((rank[..., None] == slots) * j[:, None]).sum(-2)  # [N, k]: the expert at each rank
    return probs.gather(-1, idx), idx


class _Dispatch(torch.autograd.Function):
    """``x[order // k]``: token rows copied into expert-sorted order (k copies of each). Backward sums
    each token's k copy gradients by gathering them (``dest``), instead of an atomic scatter-add."""

    @staticmethod
    def forward(ctx, x, order, dest, k: int):
        ctx.save_for_backward(dest)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad):
        (dest,) = ctx.saved_tensors
        return grad[dest].view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


def _gather_sum(ys: torch.Tensor, dest: torch.Tensor, k: int) -> torch.Tensor:
    return ys[dest].view(-1, k, ys.shape[-1]).sum(1)


class _GatherSum(torch.autograd.Function):
    """``sum_j ys[dest[t k + j]]``: un-sort the (already weighted) expert outputs and add each token's k
    copies, the transpose of `_Dispatch`: the backward copies each token's gradient to its k sorted rows
    (``order // k``)."""

    @staticmethod
    def forward(ctx, ys, order, dest, k: int):
        ctx.save_for_backward(order)
        ctx.k = k
        return _gather_sum(ys, dest, k)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad[order // ctx.k], None, None, None


def _weighted_sum(ys: torch.Tensor, weight: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """``sum_j weight[t, j] * ys[dest[t k + j]]`` -> [N, H] in ys' dtype."""
    n, k = weight.shape
    return (ys[dest].view(n, k, -1) * weight.reshape(n, k, 1).to(ys.dtype)).sum(dim=1)


class _Combine(torch.autograd.Function):
    """``sum_j w[t, j] * ys[dest[t k + j]]``: un-sort the expert outputs and add each token's k weighted
    copies. ``dest`` is a permutation, so both directions are gathers (backward by its inverse,
    ``order``): deterministic, no atomics."""

    @staticmethod
    def forward(ctx, ys, weight, order, dest):
        ctx.save_for_backward(ys, weight, order, dest)
        return _weighted_sum(ys, weight, dest)

    @staticmethod
    def backward(ctx, grad):
        ys, weight, order, dest = ctx.saved_tensors
        n, k = weight.shape
        grad_w = grad_ys = None
        if ctx.needs_input_grad[1]:
            grad_w = (ys[dest].view(n, k, -1) * grad[:, None, :]).sum(-1).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_ys = (grad[:, None, :] * weight.to(grad.dtype)[..., None]).reshape(n * k, -1)[order]
        return grad_ys, grad_w, None, None


def dispatch_copies(x: torch.Tensor, order: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """x [N, H] -> [N k, H]: the k copies of each token in expert-sorted order (`expert_order`)."""
    k = order.numel() // max(1, x.shape[0])
    if torch.is_grad_enabled() and x.requires_grad:
        return _Dispatch.apply(x, order, dest, k)
    return x[order // k]


def sum_copies(ys: torch.Tensor, order: torch.Tensor, dest: torch.Tensor, k: int) -> torch.Tensor:
    """Expert outputs ys [N k, H] (sorted order, weights applied) -> [N, H]: each token's k copies added."""
    if torch.is_grad_enabled() and ys.requires_grad:
        return _GatherSum.apply(ys, order, dest, k)
    return _gather_sum(ys, dest, k)


def combine_copies(
    ys: torch.Tensor, order: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Expert outputs ys [N k, H] (sorted order) -> [N, H]: undo the sort and sum each token's k copies
    weighted by ``weight [N, k]``."""
    if torch.is_grad_enabled() and (ys.requires_grad or weight.requires_grad):
        return _Combine.apply(ys, weight, order, dest).to(dtype)
    return _weighted_sum(ys, weight, dest).to(dtype)


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (the transformers 5 in-memory layout).

    gate_up_proj [E, 2I, H]: rows [:I] are gate_proj, rows [I:] up_proj; down_proj [E, H, I].
    The forward never syncs with the host on the grouped path, so it can be captured in a CUDA graph.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        # Token copies up to which the Triton decode kernels (`fused_moe`) replace the grouped GEMMs;
        # 0 = never. The loop sets it on the rollout model (--rollout-fused-moe, on by default where
        # triton runs; see `set_fused_moe` and `fused_moe.default_max_rows`).
        self.fused_max_rows = 0
        self.batch_invariant = False  # --true-on-policy-mode: `_invariant` (`make_batch_invariant`)

    @property
    def cuda_graph_safe(self) -> bool:
        """False in the batch-invariant path off CUDA-with-triton, which reads expert counts on the host."""
        return not self.batch_invariant or (self.gate_up_proj.is_cuda and ik.available(self.gate_up_proj))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H], topk_idx long [N, k], topk_weight [N, k] -> [N, H] = sum_k weight * expert_k(x)."""
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        if self.batch_invariant:
            return self._invariant(x, flat, topk_weight)
        # Token copies by expert: one matmul per expert.
        order, dest = expert_order(flat, self.num_experts)
        gdt = _grouped_dtype(x)
        if 0 < n * k <= self.fused_max_rows and fused_moe.available(x) and not torch.is_grad_enabled():
            # The kernels read each copy's token row themselves: no gathered copy of x.
            bounds = expert_bounds(flat, self.num_experts)
            src = (order // k).to(torch.int32)
            ys = fused_moe.fused_experts(x, src, bounds, self.gate_up_proj, self.down_proj)
            return combine_copies(ys, order, dest, topk_weight, x.dtype)
        xs = dispatch_copies(x, order, dest)
        if gdt is not None:
            # The router weights scale the SwiGLU output (before the linear down projection), so the
            # combine below is a plain sum and the weights' gradient comes from the SwiGLU backward.
            ws = dispatch_copies(topk_weight.reshape(-1, 1), order, dest).reshape(-1)  # [N k] sorted
            ys = self._grouped(xs.to(gdt), self._sorted_ends(flat[order]), gdt, ws)
            return sum_copies(ys, order, dest, k).to(x.dtype)
        if _no_sync(x, xs.shape[0] <= 16 * self.num_experts):
            # Under torch.compile (the engine's compiled decode step) or CUDA graph capture (an fp32
            # model's captured step) no host sync: each token copy is multiplied by its own expert's
            # gathered weights (cheap at decode's few rows per step).
            ys = self._gathered(xs, flat[order])
        else:
            ys = self._looped(xs, torch.bincount(flat, minlength=self.num_experts).tolist())
        return combine_copies(ys, order, dest, topk_weight, x.dtype)

    def _sorted_ends(self, sorted_ids: torch.Tensor) -> torch.Tensor:
        """`expert_bounds` (less its leading 0) from the copies' expert ids in sorted order: a binary
        search per expert, where the comparison count reads every copy once per expert (0.5 ms a
        49k-token training step)."""
        ids = torch.arange(self.num_experts, device=sorted_ids.device, dtype=sorted_ids.dtype)
        return torch.searchsorted(sorted_ids, ids, right=True, out_int32=True)

    def _looped(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            seg = xs[start : start + c]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
            start += c
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def _invariant(self, x, flat, weight) -> torch.Tensor:
        """Each expert's copies through `batch_invariant.linear` (a row's result does not depend on how
        many rows its expert got), then each token's k outputs added in routing order (`combine`). On
        CUDA the grouped Triton kernels (`invariant_kernels.experts`) with the same fixed tiles."""
        bi = batch_invariant
        n, k = weight.shape
        if ik.available(x):  # static grid, bounds on the device: no host read
            if 0 < flat.numel() <= invariant_routing.ORDER_MAX:  # a decode step: the ordering in one launch
                order, dest, src, bounds = invariant_routing.expert_order(flat, self.num_experts, k)
            else:
                order, dest = expert_order(flat, self.num_experts)
                src, bounds = order // k, expert_bounds(flat, self.num_experts)
            w = self.gate_up_proj
            ys = ik.experts(x.to(w.dtype), src, bounds, w, self.down_proj, invariant_fused.swiglu)
            return invariant_fused.combine(ys, dest, weight).to(x.dtype)
        order, dest = expert_order(flat, self.num_experts)
        xs = x[order // k]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                gate, up = bi.linear(xs[start : start + c], self.gate_up_proj[e]).chunk(2, dim=-1)
                outs.append(bi.linear(bi.silu_mul(gate, up), self.down_proj[e]))
                start += c
        ys = torch.cat(outs) if outs else xs
        return bi.combine(ys[dest].view(n, k, -1), weight).to(x.dtype)

    def _gathered(self, xs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        h = torch.bmm(self.gate_up_proj[experts], xs.unsqueeze(-1)).squeeze(-1)
        gate, up = h.chunk(2, dim=-1)
        act = (F.silu(gate) * up).unsqueeze(-1)
        return torch.bmm(self.down_proj[experts], act).squeeze(-1)

    def _grouped(
        self, xs: torch.Tensor, offs: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sorted copies xs [M, H] through their experts (``offs``: `_sorted_ends`), each copy's SwiGLU
        output scaled by ``weight[M]`` when given."""
        h = torch._grouped_mm(xs, self.gate_up_proj.to(dtype).transpose(1, 2), offs=offs)
        return torch._grouped_mm(swiglu(h, weight), self.down_proj.to(dtype).transpose(1, 2), offs=offs)


def set_fused_moe(model: nn.Module, max_rows: int) -> int:
    """Let every `Experts` of `model` use the Triton decode kernels for up to `max_rows` token copies
    (0 turns them off); returns how many modules were set. Meant for the rollout model only."""
    mods = [m for m in model.modules() if isinstance(m, Experts)]
    for m in mods:
        m.fused_max_rows = max_rows
    return len(mods)


class SparseMoeBlock(nn.Module):
    """Qwen3-MoE sparse MLP: softmax router over E experts, top-k, optional renormalisation of the k."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, intermediate: int, norm_topk_prob: bool,
                 moe_index: int) -> None:  # fmt: skip
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.moe_index = moe_index  # position among the MoE layers, the index into RoutingState lists
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)
        self.batch_invariant = False  # --true-on-policy-mode: `invariant_routing.route` (CUDA) or `row_sum`

    def route(self, x: torch.Tensor, routing: RoutingState | None, shape: tuple[int, int]):
        """x [N, H] -> (topk_idx long [N, k], topk_weight [N, k] in x's dtype)."""
        logits = self.gate(x)
        fused = self.batch_invariant and ik.available(logits)  # the mode's softmax + top-k + renorm kernel
        if fused:
            probs, own_idx, own_w = invariant_routing.route(logits, self.top_k, self.norm_topk_prob, x.dtype)
        else:
            probs = F.softmax(logits.float(), dim=-1)
            own_w, own_idx = _topk(probs, self.top_k)
        idx, w = own_idx, own_w
        replay = routing is not None and routing.replay is not None
        if replay:
            m = self.moe_index
            if m >= len(routing.replay) or tuple(routing.replay[m].shape) != (*shape, self.top_k):
                got = None if m >= len(routing.replay) else tuple(routing.replay[m].shape)
                raise ValueError(
                    f"replay route of MoE layer {m} has shape {got}, expected {(*shape, self.top_k)}"
                )
            idx = routing.replay[m].reshape(-1, self.top_k).to(device=x.device, dtype=torch.long)
            w = probs.gather(1, idx)
        if self.norm_topk_prob and fused and replay:
            w = invariant_routing.normalize_topk(w, x.dtype)  # sum, divide and cast in one kernel
        elif self.norm_topk_prob and not fused:
            w = w / (batch_invariant.row_sum(w) if self.batch_invariant else w.sum(dim=-1, keepdim=True))
        if routing is not None and routing.record:
            routing.router_topk.append(own_idx.view(*shape, self.top_k))
            routing.used_topk.append(idx.view(*shape, self.top_k))
        return idx, w.to(x.dtype)

    def forward(self, x: torch.Tensor, routing: RoutingState | None = None) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        idx, w = self.route(flat, routing, (b, t))
        return self.experts(flat, idx, w).view(b, t, h)
