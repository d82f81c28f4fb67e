"""Training side of INT4 QAT: per-group symmetric fake quantization with a straight-through gradient.

`fake_quant(w)` returns ``clamp(round(w / s), -7, 7) * s`` (``s = max(max|w| / 7, 1e-5)`` per group of the
input dimension) in the forward and passes the gradient to ``w`` unchanged. `FakeQuantLinear` and
`FakeQuantExperts` keep the master weights as the same Parameters under the same names, so optimizer,
checkpoints and the weight sync see nothing new.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.api import Experts
from miles_int4qat.packing import QMAX, group_scales


def fake_quant_values(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The dequantized INT4 values of ``w`` in ``w``'s dtype (computed in fp32), without any gradient."""
    scale = group_scales(w, group_size)[..., None]
    g = w.detach().float().unflatten(-1, (-1, group_size))
    return (torch.clamp(torch.round(g / scale), -QMAX, QMAX) * scale).flatten(-2).to(w.dtype)


def fake_quant(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Forward: the INT4 values of ``w``; backward: identity to ``w`` (straight-through estimator)."""
    return w + (fake_quant_values(w, group_size) - w).detach()


def _grouped_bf16(x: torch.Tensor) -> bool:
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    autocast_bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast_bf16


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight; ``weight``/``bias`` stay the masters."""

    group_size: int = 128

    @classmethod
    def wrap(cls, linear: nn.Linear, group_size: int) -> FakeQuantLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameter objects
        new.group_size = group_size
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.group_size), self.bias)


class FakeQuantExperts(Experts):
    """`Experts` whose expert matmuls use fake-quantized ``gate_up_proj`` / ``down_proj``."""

    @classmethod
    def wrap(cls, experts: Experts, group_size: int) -> FakeQuantExperts:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_experts, new.intermediate = experts.num_experts, experts.intermediate
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.group_size = group_size
        return new

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        from miles_int4qat.modules import moe_combine

        gate_up = fake_quant(self.gate_up_proj, self.group_size)
        down = fake_quant(self.down_proj, self.group_size)

        def run(xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            if _grouped_bf16(xs):  # as the core: bf16 grouped GEMMs on CUDA (also under --bf16 autocast)
                offs = counts.cumsum(0).to(torch.int32)
                xs, gu, dn = xs.to(torch.bfloat16), gate_up.to(torch.bfloat16), down.to(torch.bfloat16)
                gate, up = torch._grouped_mm(xs, gu.transpose(1, 2), offs=offs).chunk(2, dim=-1)
                return torch._grouped_mm(F.silu(gate) * up, dn.transpose(1, 2), offs=offs)
            outs, start = [], 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    seg = xs[start : start + c]
                    gate, up = F.linear(seg, gate_up[e]).chunk(2, dim=-1)
                    outs.append(F.linear(F.silu(gate) * up, down[e]))
                    start += c
            return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

        return moe_combine(x, topk_idx, topk_weight, self.num_experts, run)
