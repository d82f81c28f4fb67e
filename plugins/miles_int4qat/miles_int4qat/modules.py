"""Rollout side: modules that hold ONLY packed INT4 weights and per-group scales, and the INT4 matmul.

`Int4Linear` replaces an ``nn.Linear`` and `Int4Experts` the fused `Experts` of an MoE layer in the
engine's model. Both re-quantize in ``weight_loader`` from the master tensors of each weight sync, so the
engine never holds a bf16 copy. Two kernels (`Int4Kernel`):

- ``tinygemm`` (CUDA, bf16): ``torch._weight_int4pack_mm`` on the layout of
  ``torch._convert_weight_to_int4pack`` (int32 ``[N/8, K/(16*tiles), 32, tiles/2]``) with bf16
  scale-and-zero ``[K/g, N, 2]``; the nibble is ``q + 8`` and the zero 0, so it computes ``q * scale``.
- ``dequant`` (CPU, or any CUDA shape tinygemm refuses): the compressed-tensors layout (int32
  ``[N, K/8]``, bf16 scales ``[N, K/g]``), dequantized per call into a transient matrix, then a matmul.

`Int4Experts` built ``grouped`` keep the compressed-tensors layout and run every expert in two Triton
launches (`miles_int4qat.triton_experts`) with no host sync, so the engine captures its decode steps in
CUDA graphs; otherwise they loop over the experts with one of the two kernels above.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from miles_core import UsageError
from miles_core.api import (
    Experts,
    combine_copies,
    dispatch_copies,
    expert_bounds,
    expert_order,
    swap_modules,
)
from miles_int4qat import triton_experts
from miles_int4qat.packing import PACK, SCALE_DTYPE, check_group_size, dequantize, quantize, quantize_pack

TINYGEMM_GROUPS = (32, 64, 128, 256)
_EXPERT_REST = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def tinygemm_ok(
    device: torch.device, dtype: torch.dtype, group_size: int, shapes: list[tuple[int, int]]
) -> bool:
    """Whether ``torch._weight_int4pack_mm`` takes every (N, K) in ``shapes`` on this device and dtype."""
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and hasattr(torch, "_weight_int4pack_mm")
        and group_size in TINYGEMM_GROUPS
        and all(n % 8 == 0 and k % 32 == 0 for n, k in shapes)
    )


class Int4Kernel:
    """Storage layout and matmul of one INT4 format (``tinygemm`` or ``dequant``); see the module doc."""

    def __init__(self, kind: str, group_size: int, dtype: torch.dtype, device: torch.device) -> None:
        if kind not in ("tinygemm", "dequant"):
            raise ValueError(f"unknown INT4 kernel {kind!r}")
        self.kind, self.group_size, self.dtype, self.device = kind, group_size, dtype, torch.device(device)

    def alloc(self, lead: tuple[int, ...], n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty (packed, scales) for ``lead`` stacked ``[n, k]`` matrices."""
        g, dev = self.group_size, self.device
        if self.kind == "tinygemm":
            t = _tiles(k)
            packed = torch.zeros(*lead, n // 8, k // (16 * t), 32, t // 2, dtype=torch.int32, device=dev)
            return packed, torch.zeros(*lead, k // g, n, 2, dtype=torch.bfloat16, device=dev)
        packed = torch.zeros(*lead, n, k // PACK, dtype=torch.int32, device=dev)
        return packed, torch.zeros(*lead, n, k // g, dtype=SCALE_DTYPE, device=dev)

    @torch.no_grad()
    def store(self, packed: torch.Tensor, scales: torch.Tensor, w: torch.Tensor, row0: int = 0) -> None:
        """Quantize ``w [r, k]`` into rows ``row0 .. row0 + r`` of one matrix's (packed, scales)."""
        w = w.to(self.device)
        rows = slice(row0, row0 + w.shape[0])
        if self.kind == "dequant":
            p, s = quantize_pack(w, self.group_size)
            packed[rows], scales[rows] = p, s.to(scales.dtype)
            return
        if row0 % 8 or w.shape[0] % 8:
            raise ValueError("tinygemm stores whole tiles of 8 rows")
        q, s = quantize(w, self.group_size)
        nib = (q.to(torch.int32) + 8).to(torch.uint8)
        u8 = (nib[:, ::2] << 4 | nib[:, 1::2]).contiguous()  # two nibbles a byte, the even index high
        packed[row0 // 8 : (row0 + w.shape[0]) // 8] = torch._convert_weight_to_int4pack(
            u8, packed.shape[-1] * 2
        )
        scales[:, rows, 0] = s.t().to(torch.bfloat16)
        scales[:, rows, 1] = 0

    def matmul(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x [M, K] @ W.T`` -> ``[M, N]`` in ``x``'s dtype, W the INT4 matrix (packed, scales)."""
        if self.kind == "tinygemm":
            y = torch._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, self.group_size, scales)
            return y.to(x.dtype)
        return F.linear(x, dequantize(packed, scales, self.group_size, x.dtype))

    def dequant(self, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The matrix ``[N, K]`` (for tests and export); tinygemm recovers it by multiplying the identity."""
        if self.kind == "dequant":
            return dequantize(packed, scales, self.group_size, self.dtype)
        k = packed.shape[1] * packed.shape[-1] * 32
        eye = torch.eye(k, dtype=torch.bfloat16, device=self.device)
        return torch._weight_int4pack_mm(eye, packed, self.group_size, scales).t()


def make_kernel(
    kind: str, group_size: int, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]]
) -> Int4Kernel:
    """``kind`` "auto" picks tinygemm where it applies (CUDA, bf16, supported shapes), else dequant."""
    ok = tinygemm_ok(torch.device(device), dtype, group_size, shapes)
    if kind == "tinygemm" and not ok:
        raise UsageError(
            "the tinygemm INT4 kernel needs CUDA, bf16, group size 32/64/128/256 and dims divisible by 32; "
            "use the dequant kernel here."
        )
    chosen = "tinygemm" if kind == "tinygemm" or (kind == "auto" and ok) else "dequant"
    return Int4Kernel(chosen, group_size, dtype, device)


def moe_combine(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int,
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """Sort token copies by expert, ``run(xs, counts)`` the experts, then un-permute and sum the k copies
    with their gate weights (the same order of operations as the core's `Experts`)."""
    flat = topk_idx.reshape(-1)
    order, dest = expert_order(flat, num_experts)
    ys = run(dispatch_copies(x, order, dest), torch.bincount(flat, minlength=num_experts))
    return combine_copies(ys, order, dest, topk_weight, x.dtype)


class Int4Linear(nn.Module):
    """A linear layer holding packed INT4 ``weight_packed`` and ``weight_scale`` (plus any bias)."""

    def __init__(self, in_features: int, out_features: int, kernel: Int4Kernel, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        packed, scales = kernel.alloc((), out_features, in_features)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("weight_scale", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Int4Kernel) -> Int4Linear:
        new = cls(linear.in_features, linear.out_features, kernel, linear.bias)
        kernel.store(new.weight_packed, new.weight_scale, linear.weight.detach())
        return new

    def weight_loader(self, rest: str, tensor: torch.Tensor) -> None:
        """Weight sync: ``rest`` is ``"weight"`` (re-quantized here) or ``"bias"``."""
        if rest == "weight" and tuple(tensor.shape) == (self.out_features, self.in_features):
            self.kernel.store(self.weight_packed, self.weight_scale, tensor)
        elif rest == "bias" and self.bias is not None and tensor.shape == self.bias.shape:
            self.bias.copy_(tensor)
        else:
            raise UsageError(
                f"INT4 linear got tensor {rest!r} of shape {tuple(tensor.shape)}, expected 'weight' "
                f"{(self.out_features, self.in_features)}; check that the weights match config.json."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.matmul(x.reshape(-1, self.in_features), self.weight_packed, self.weight_scale)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int4Experts(nn.Module):
    """E SwiGLU experts in packed INT4: ``gate_up`` ``[E, 2I, H]``, ``down`` ``[E, H, I]`` (as `Experts`).

    ``grouped`` (the ``dequant`` layout and a group size `triton_experts.usable` takes): inference runs the
    grouped Triton kernels wherever they run (CUDA, or Triton's interpreter); else the per-expert loop.
    """

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, kernel: Int4Kernel, grouped: bool = False
    ) -> None:
        super().__init__()
        if grouped and not (kernel.kind == "dequant" and triton_experts.usable(kernel.group_size)):
            raise ValueError("grouped INT4 experts need triton, the dequant layout and a group size of 16k")
        self.num_experts, self.hidden, self.intermediate, self.kernel = (
            num_experts,
            hidden,
            intermediate,
            kernel,
        )
        self.grouped = grouped
        gu_p, gu_s = kernel.alloc((num_experts,), 2 * intermediate, hidden)
        d_p, d_s = kernel.alloc((num_experts,), hidden, intermediate)
        self.register_buffer("gate_up_packed", gu_p)
        self.register_buffer("gate_up_scale", gu_s)
        self.register_buffer("down_packed", d_p)
        self.register_buffer("down_scale", d_s)

    @property
    def cuda_graph_safe(self) -> bool:
        """The grouped kernels never sync with the host; the per-expert loop reads the expert counts on
        the host (one sync per layer), which a CUDA graph cannot capture (the engine then decodes eagerly)."""
        return self.grouped or not self.down_packed.is_cuda

    @classmethod
    def from_experts(cls, experts: Experts, kernel: Int4Kernel, grouped: bool = False) -> Int4Experts:
        e, two_i, h = experts.gate_up_proj.shape
        new = cls(e, h, two_i // 2, kernel, grouped)
        new.weight_loader("gate_up_proj", experts.gate_up_proj.detach())
        new.weight_loader("down_proj", experts.down_proj.detach())
        return new

    def weight_loader(self, rest: str, tensor: torch.Tensor) -> None:
        """Weight sync: per-expert HF names (``"3.gate_proj.weight"``) or the fused 3-D tensors."""
        i, h, k = self.intermediate, self.hidden, self.kernel
        m = _EXPERT_REST.match(rest)
        if m is not None and int(m.group(1)) < self.num_experts:
            e, kind = int(m.group(1)), m.group(2)
            want = (h, i) if kind == "down_proj" else (i, h)
            if tuple(tensor.shape) == want:
                if kind == "down_proj":
                    k.store(self.down_packed[e], self.down_scale[e], tensor)
                else:
                    k.store(
                        self.gate_up_packed[e], self.gate_up_scale[e], tensor, 0 if kind == "gate_proj" else i
                    )
                return
        elif rest == "gate_up_proj" and tuple(tensor.shape) == (self.num_experts, 2 * i, h):
            for e in range(self.num_experts):
                k.store(self.gate_up_packed[e], self.gate_up_scale[e], tensor[e])
            return
        elif rest == "down_proj" and tuple(tensor.shape) == (self.num_experts, h, i):
            for e in range(self.num_experts):
                k.store(self.down_packed[e], self.down_scale[e], tensor[e])
            return
        raise UsageError(
            f"INT4 experts got tensor {rest!r} of shape {tuple(tensor.shape)}, which matches none of its "
            f"{self.num_experts} experts (hidden {h}, intermediate {i}); check the weights match config.json."
        )

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        k = self.kernel
        if self.grouped and triton_experts.available(x) and not torch.is_grad_enabled():
            flat = topk_idx.reshape(-1)
            order, dest = expert_order(flat, self.num_experts)
            src = (order // topk_idx.shape[1]).to(torch.int32)
            ys = triton_experts.int4_experts(
                x, src, expert_bounds(flat, self.num_experts), self.gate_up_packed, self.gate_up_scale,
                self.down_packed, self.down_scale, k.group_size,
            )  # fmt: skip
            return combine_copies(ys, order, dest, topk_weight, x.dtype)
        if k.kind == "dequant":
            # One dequantization of the layer's experts per call (transient, freed after the layer) costs
            # far fewer small ops than one per expert; the packed tensors stay the only ones held.
            gu = dequantize(self.gate_up_packed, self.gate_up_scale, k.group_size, x.dtype)
            dn = dequantize(self.down_packed, self.down_scale, k.group_size, x.dtype)

            def mm_gu(seg: torch.Tensor, e: int) -> torch.Tensor:
                return F.linear(seg, gu[e])

            def mm_dn(seg: torch.Tensor, e: int) -> torch.Tensor:
                return F.linear(seg, dn[e])
        else:

            def mm_gu(seg: torch.Tensor, e: int) -> torch.Tensor:
                return k.matmul(seg, self.gate_up_packed[e], self.gate_up_scale[e])

            def mm_dn(seg: torch.Tensor, e: int) -> torch.Tensor:
                return k.matmul(seg, self.down_packed[e], self.down_scale[e])

        def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            outs, start = [], 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    seg = xs[start : start + c]
                    gate, up = mm_gu(seg, e).chunk(2, dim=-1)
                    outs.append(mm_dn(F.silu(gate) * up, e))
                    start += c
            return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

        return moe_combine(x, topk_idx, topk_weight, self.num_experts, run)


# ------------------------------------------------------------------------------------------------ swapping


def _in_scope(name: str, module: nn.Module, scope: str) -> bool:
    if isinstance(module, Experts):
        return True
    # all-linear leaves the router (its top-k decides everything downstream) and the lm_head in full precision
    return (
        scope == "all-linear"
        and type(module) is nn.Linear
        and name != "lm_head"
        and not name.endswith("mlp.gate")
    )


def scope_modules(model: nn.Module, scope: str) -> dict[str, nn.Module]:
    """The modules ``scope`` ("experts" or "all-linear") quantizes, by name."""
    return {n: m for n, m in model.named_modules() if n and _in_scope(n, m, scope)}


def scope_shapes(model: nn.Module, scope: str, group_size: int) -> list[tuple[int, int]]:
    """(N, K) of every matrix in scope, after checking that ``group_size`` divides each K."""
    shapes = []
    for name, mod in scope_modules(model, scope).items():
        if isinstance(mod, Experts):
            _, two_i, h = mod.gate_up_proj.shape
            check_group_size(h, group_size, f"{name}.gate_up_proj")
            check_group_size(two_i // 2, group_size, f"{name}.down_proj")
            shapes += [(two_i, h), (h, two_i // 2)]
        else:
            check_group_size(mod.in_features, group_size, f"{name}.weight")
            shapes.append((mod.out_features, mod.in_features))
    return shapes


def grouped_experts_ok(device: torch.device, group_size: int) -> bool:
    """Whether INT4 experts on ``device`` run the grouped Triton kernels: CUDA, triton, group size 16k."""
    return torch.device(device).type == "cuda" and triton_experts.usable(group_size)


def quantize_for_rollout(model: nn.Module, scope: str, group_size: int, kind: str = "auto") -> list[str]:
    """Swap the scope's modules of an engine model for packed INT4 ones; returns the swapped names.

    With ``kind`` "auto" on CUDA the experts run the grouped Triton kernels (`grouped_experts_ok`); an
    explicit ``tinygemm`` or ``dequant`` keeps them on that kernel's per-expert loop."""
    shapes = scope_shapes(model, scope, group_size)
    p = next(model.parameters())
    kernel = make_kernel(kind, group_size, p.dtype, p.device, shapes)
    grouped = kind == "auto" and grouped_experts_ok(p.device, group_size)
    expert_kernel = Int4Kernel("dequant", group_size, p.dtype, p.device) if grouped else kernel

    def swap(name: str, mod: nn.Module) -> nn.Module | None:
        if not _in_scope(name, mod, scope):
            return None
        if isinstance(mod, Experts):
            return Int4Experts.from_experts(mod, expert_kernel, grouped)
        return Int4Linear.from_linear(mod, kernel)

    return swap_modules(model, swap)


def fake_quantize_for_training(model: nn.Module, scope: str, group_size: int) -> list[str]:
    """Swap the scope's modules of a training model for fake-quant ones sharing the master Parameters."""
    from miles_int4qat.fake_quant import FakeQuantExperts, FakeQuantLinear

    scope_shapes(model, scope, group_size)

    def swap(name: str, mod: nn.Module) -> nn.Module | None:
        if not _in_scope(name, mod, scope) or isinstance(mod, (FakeQuantExperts, FakeQuantLinear)):
            return None
        if isinstance(mod, Experts):
            return FakeQuantExperts.wrap(mod, group_size)
        return FakeQuantLinear.wrap(mod, group_size)

    return swap_modules(model, swap)


def int4_bytes(model: nn.Module) -> int:
    """Bytes of the packed weights and scales held by the model's INT4 modules (biases excluded)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, (Int4Linear, Int4Experts)):
            total += sum(b.nbytes for n, b in mod.named_buffers(recurse=False) if n != "bias")
    return total


def scope_weight_numel(model: nn.Module, scope: str) -> int:
    """Number of weights in scope of an unquantized model (to price them in bf16: 2 bytes each)."""
    total = 0
    for mod in scope_modules(model, scope).values():
        total += (
            mod.gate_up_proj.numel() + mod.down_proj.numel()
            if isinstance(mod, Experts)
            else mod.weight.numel()
        )
    return total
