"""FP8 linear layers: `Fp8Linear` (attention / dense MLP projections) and `Fp8Experts` (the MoE experts).

Both modes run the same forward, ``y = mm(quantize(x), quantize(W))``, through `fp8_mm`:
- rollout (engine): the module holds only the FP8 weight and its fp32 scales; `weight_loader` re-quantizes
  each HF tensor the weight sync hands it, so no high-precision copy is kept.
- train / ref (unified FP8): the module keeps the master weight as its nn.Parameter (same name, so the
  optimizer, checkpoints and the weight sync see no difference) and quantizes it on every forward;
  the backward is straight-through: gradients flow to the master weight as if quantization were identity,
  computed from the dequantized FP8 operands in bf16 for a bf16 model on CUDA, else in fp32.
The GEMM is chosen once per process (`gemm_path`, never from the row count): blockwise runs the Triton
GEMM of `miles_fp8.triton_fp8` on CUDA (e4m3 cards) and under Triton's interpreter; rowwise / tensorwise
run ``torch._scaled_mm`` on CUDA where a probe passed; everything else is emulated: dequantize both
operands to fp32 and matmul, the same numbers the FP8 GEMM multiplies.
Rollout experts of the blockwise recipe run the grouped Triton kernels (`miles_fp8.triton_experts`) on
CUDA: no host sync, so the engine captures their decode steps in CUDA graphs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from miles_core.api import Experts, combine_copies, expert_bounds, expert_order
from miles_fp8 import triton_experts, triton_fp8
from miles_fp8.dequant import dequantize_as
from miles_fp8.quant import FP8_DTYPE, Recipe, dequantize, quantize, quantize_dequantize

log = logging.getLogger(__name__)
# (recipe, out dtype, CUDA device index) -> whether torch._scaled_mm serves that recipe there: probed once
# at fixed shapes, so the GEMM path never depends on a call's row count or on CUDA graph capture.
_SCALED_MM_OK: dict[tuple[str, torch.dtype, int], bool] = {}


def _scaled_mm(xq, xs, wq, ws, recipe: Recipe, out_dtype: torch.dtype) -> torch.Tensor:
    """``torch._scaled_mm`` with the scale layouts it wants for each recipe (decode scales)."""
    if recipe.name == "tensorwise":
        sa, sb = xs.reshape(()), ws.reshape(())
    elif recipe.name == "rowwise":
        sa, sb = xs.reshape(-1, 1).contiguous(), ws.reshape(1, -1).contiguous()
    else:  # 1x128 activation tiles (outer-dim-major scales) x 128x128 weight blocks
        sa, sb = xs.t().contiguous().t(), ws.t()
    return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _probe_scaled_mm(recipe: Recipe, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Run ``_scaled_mm`` for `recipe` at fixed shapes (1 and 67 rows) against the emulation."""
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        raise RuntimeError(
            "an FP8 linear was first called inside a CUDA graph capture or torch.compile trace; run one "
            "eager forward (as the engine's prefill does) before capturing."
        )
    if not hasattr(torch, "_scaled_mm"):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(384, 256, device=device, generator=g)
    wq, ws = quantize(w, recipe.weight_tile)
    w_deq = dequantize(wq, ws, recipe.weight_tile)
    try:
        for rows in (1, 67):
            x = torch.randn(rows, 256, device=device, generator=g).to(out_dtype)
            xq, xs = quantize(x, recipe.act_tile, fast=True)
            y = _scaled_mm(xq, xs, wq, ws, recipe, out_dtype).float()
            ref = quantize_dequantize(x, recipe.act_tile) @ w_deq.t()
            err = float((y - ref).norm() / ref.norm())
            if not err < 1e-2:
                raise ValueError(f"relative error {err:.2e} against the emulation")
    except (RuntimeError, NotImplementedError, ValueError) as e:  # arch / library / dtype limits
        log.warning("torch._scaled_mm unusable for %s -> %s (%s); emulating", recipe.name, out_dtype, e)
        return False
    return True


def gemm_path(x: torch.Tensor, wq: torch.Tensor, recipe: Recipe) -> str:
    """How `fp8_mm` multiplies x [M, K] by the FP8 weight wq [N, K]: ``"triton"`` (blockwise: the Triton
    GEMM of `miles_fp8.triton_fp8`, on e4m3 cards and under the interpreter), ``"scaled_mm"`` (rowwise,
    tensorwise on CUDA where the probe passed and K, N are multiples of 16) or ``"emulate"``. Decided from
    the recipe, the device, x's dtype and the weight's shape: never from M, never per call by a failure."""
    if recipe.name == "blockwise":
        return "triton" if triton_fp8.available(x) else "emulate"
    if not x.is_cuda or wq.shape[0] % 16 or wq.shape[1] % 16:
        return "emulate"
    out_dtype = _out_dtype(x)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    key = (recipe.name, out_dtype, index)
    if key not in _SCALED_MM_OK:
        _SCALED_MM_OK[key] = _probe_scaled_mm(recipe, out_dtype, x.device)
    return "scaled_mm" if _SCALED_MM_OK[key] else "emulate"


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32


def fp8_mm(
    x: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    recipe: Recipe,
    w_deq: torch.Tensor | None = None,
    keep_operands: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x [M, K] @ dequant(wq, ws).T`` with x quantized by the recipe's activation tiles (`gemm_path`).

    :param w_deq: ``dequant(wq, ws)`` in fp32 if the caller already has it (the emulated path reuses it).
    :param keep_operands: also return x's quantization on the Triton path (training's backward needs it;
        the kernel quantizes x in registers and keeps nothing).
    :returns: ``(y [M, N] in x's dtype, xq, xs, x_deq)``: for the backward, the encoded activation
        (FP8 GEMM paths) or its fp32 dequantization (emulated path); the other pair is None.
    """
    path = gemm_path(x, wq, recipe)
    if path == "triton":
        large = x.shape[0] >= triton_fp8.PREQ_ROWS
        if not (keep_operands or large) or not triton_fp8.preq_ok(x.device):  # quantize inside the GEMM
            y = triton_fp8.fp8_linear(x, wq, ws)
            if not keep_operands:
                return y, None, None, None
            return (y, *quantize(x, recipe.act_tile, fast=True), None)  # the codes the kernel used
        # Large M (or codes kept for the backward): one fused quantization pass, then the same GEMM on
        # the codes; the same numbers as quantizing in the kernel (probed), so rows stay independent of M.
        xq, xs = quantize(x, recipe.act_tile, fast=True)
        y = triton_fp8.fp8_linear_quantized(xq, xs, wq, ws, x.dtype)
        return (y, xq, xs, None) if keep_operands else (y, None, None, None)
    if path == "scaled_mm":
        xq, xs = quantize(x, recipe.act_tile, fast=True)
        try:
            return _scaled_mm(xq, xs, wq, ws, recipe, _out_dtype(x)).to(x.dtype), xq, xs, None
        except (RuntimeError, NotImplementedError, ValueError) as e:
            raise RuntimeError(
                f"torch._scaled_mm failed for a {tuple(x.shape)} x {tuple(wq.shape)} {recipe.name} FP8 GEMM "
                f"although it passed its probe ({e}); use --fp8-recipe blockwise (Triton GEMM) instead."
            ) from e
    x_deq = quantize_dequantize(x, recipe.act_tile)  # == dequantize(*quantize(x)), in fewer ops
    if w_deq is None:
        w_deq = dequantize(wq, ws, recipe.weight_tile)
    return (x_deq @ w_deq.t()).to(x.dtype), None, None, x_deq


class _Fp8LinearFn(torch.autograd.Function):
    """Forward on quantized x and W; straight-through backward to the (master) weight and the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Recipe, pre: tuple | None = None):
        # `pre` = (wq, ws, w_deq) of this weight when the caller quantized many at once (experts).
        if pre is None:
            wq, ws = quantize(weight.detach(), recipe.weight_tile, fast=weight.is_cuda)
            w_deq = None
        else:
            wq, ws, w_deq = pre
        y, xq, xs, x_deq = fp8_mm(x.detach(), wq, ws, recipe, w_deq, keep_operands=True)
        ctx.recipe, ctx.x_dtype, ctx.w_dtype = recipe, x.dtype, weight.dtype
        # Keep the FP8 operands (no high-precision copy) unless the emulation already made fp32 ones.
        ctx.save_for_backward(xq, xs, wq, ws, x_deq, w_deq)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xq, xs, wq, ws, x_deq, w_deq = ctx.saved_tensors
        dt = backward_dtype(g, ctx.x_dtype)
        dx, dw = linear_backward(g, xq, xs, wq, ws, x_deq, w_deq, ctx.recipe, dt, ctx.needs_input_grad[:2])
        grads = (None if t is None else t.to(d) for t, d in zip((dx, dw), (ctx.x_dtype, ctx.w_dtype)))
        return *grads, None, None


def backward_dtype(g: torch.Tensor, x_dtype: torch.dtype) -> torch.dtype:
    """The straight-through backward's GEMM dtype: bf16 for a bf16 model on CUDA (the --bf16 trainer's
    own backward precision: bf16 operands, fp32 accumulation), else fp32."""
    return torch.bfloat16 if g.is_cuda and g.dtype == x_dtype == torch.bfloat16 else torch.float32


def linear_backward(g, xq, xs, wq, ws, x_deq, w_deq, recipe: Recipe, dtype: torch.dtype, needs=(True, True)):
    """``(dx, dw) = (g @ deq(Wq), g^T @ deq(xq))`` in ``dtype`` (`backward_dtype`): the FP8 operands the
    forward multiplied, dequantized (`dequant.dequantize_as`: one pass, rounded once to ``dtype``) unless the
    emulated forward left their fp32 dequantization (``x_deq``, ``w_deq``). Each is None where not needed."""
    dx = dw = None
    g = g.to(dtype)
    if needs[0]:
        w = dequantize_as(wq, ws, recipe.weight_tile, dtype) if w_deq is None else w_deq.to(dtype)
        dx = g @ w
    if needs[1]:
        x = dequantize_as(xq, xs, recipe.act_tile, dtype) if x_deq is None else x_deq.to(dtype)
        dw = g.t() @ x
    return dx, dw


def _fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    recipe: Recipe,
    pre: tuple | None = None,
    w_deq: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N]; `scale` None means `weight` is a master weight quantized on the fly."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):  # the FP8 math fixes its own precision
        if scale is None:
            y = _Fp8LinearFn.apply(x2, weight, recipe, pre)
        else:
            y = fp8_mm(x2, weight, scale, recipe, w_deq)[0]
    return y.reshape(*lead, y.shape[-1])


class Fp8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` whose matmul runs in FP8 (see the module docstring for the two modes)."""

    def __init__(self, linear: nn.Linear, recipe: Recipe, *, train: bool, name: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.recipe, self.train_mode, self.name = recipe, train, name
        self.bias = linear.bias
        if train:
            self.weight = linear.weight  # the master weight itself: optimizer state stays attached
        else:
            q, s = quantize(linear.weight.detach(), recipe.weight_tile, name=f"{name}.weight")
            self.register_buffer("weight", q.contiguous())  # dense (quantize pads partial tiles)
            self.register_buffer("weight_scale_inv", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fp8_linear(x, self.weight, None if self.train_mode else self.weight_scale_inv, self.recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def weight_loader(self, rest: str, tensor: torch.Tensor) -> None:
        """Take an HF tensor under this module (weight sync): re-quantize ``weight``, copy ``bias``."""
        if rest == "bias" and self.bias is not None:
            self.bias.copy_(tensor)
        elif rest == "weight" and self.train_mode:
            self.weight.copy_(tensor)
        elif rest == "weight":
            _check_shape(self.name, tuple(tensor.shape), tuple(self.weight.shape))
            q, s = quantize(
                tensor.to(self.weight.device), self.recipe.weight_tile, name=f"{self.name}.weight"
            )
            self.weight.copy_(q)
            self.weight_scale_inv.copy_(s)
        else:
            raise ValueError(f"Fp8Linear {self.name} has no tensor {rest!r}")

    def extra_repr(self) -> str:
        mode = "train (master weight, STE)" if self.train_mode else "rollout (fp8 weight)"
        return f"{self.in_features}, {self.out_features}, recipe={self.recipe.name}, {mode}"


def _check_shape(name: str, got: tuple, want: tuple) -> None:
    if got != want:
        raise ValueError(f"weight {name} has shape {got} but the FP8 layer expects {want}")


class Fp8Experts(nn.Module):
    """FP8 version of `miles_core.model.Experts` (same forward signature and routing arithmetic).

    Each expert's gate, up and down projection is quantized on its own, exactly as HF stores them
    (``experts.{e}.gate_proj.weight`` + ``weight_scale_inv``), so a block never straddles gate and up.
    """

    KINDS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, experts: Experts, recipe: Recipe, *, train: bool, name: str = "") -> None:
        super().__init__()
        self.num_experts, self.intermediate = experts.num_experts, experts.intermediate
        self.recipe, self.train_mode, self.name = recipe, train, name
        if train:
            self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
            return
        for kind in self.KINDS:
            w = self._master_view(experts, kind).detach()
            q, s = quantize(w, recipe.weight_tile, name=f"{name}.{kind}")
            self.register_buffer(f"{kind}_fp8", q.contiguous())
            self.register_buffer(f"{kind}_scale_inv", s)

    @property
    def grouped(self) -> bool:
        """Whether inference runs the grouped Triton kernels (rollout weights, blockwise, triton)."""
        return not self.train_mode and self.recipe.name == "blockwise" and triton_experts.triton is not None

    @property
    def train_grouped(self) -> bool:
        """Whether the training forward (unified FP8) runs the same grouped kernels (`train_experts`)."""
        return self.train_mode and self.recipe.name == "blockwise" and triton_experts.triton is not None

    @property
    def cuda_graph_safe(self) -> bool:
        """The grouped kernels never sync with the host; the per-expert loop sizes itself on the host (one
        sync per layer), which a CUDA graph cannot capture, so the engine then decodes eagerly."""
        w = self.down_proj if self.train_mode else self.down_proj_fp8
        return not w.is_cuda or (self.grouped and triton_experts.device_ok(w.device))

    def _master_view(self, experts: nn.Module, kind: str) -> torch.Tensor:
        i = self.intermediate
        if kind == "gate_proj":
            return experts.gate_up_proj[:, :i]
        if kind == "up_proj":
            return experts.gate_up_proj[:, i:]
        return experts.down_proj

    def _prepare(self, device: torch.device, fp32: bool | None = None) -> dict[str, tuple]:
        """Per kind: (wq [E, ...], ws [E, ...], fp32 dequantized weights or None), all experts at once;
        batched quantization gives each expert exactly what quantizing it alone would. The fp32 copies
        (for the emulation) are made on CPU unless ``fp32`` says otherwise."""
        out = {}
        for kind in self.KINDS:
            if self.train_mode:
                w = self._master_view(self, kind).detach()
                wq, ws = quantize(w, self.recipe.weight_tile, fast=w.is_cuda)
            else:
                wq, ws = getattr(self, f"{kind}_fp8"), getattr(self, f"{kind}_scale_inv")
            want = device.type != "cuda" if fp32 is None else fp32
            deq = dequantize(wq, ws, self.recipe.weight_tile) if want else None
            out[kind] = (wq, ws, deq)
        return out

    def _linear(self, x: torch.Tensor, kind: str, e: int, prep: dict[str, tuple]) -> torch.Tensor:
        wq, ws, deq = prep[kind]
        deq_e = None if deq is None else deq[e]
        if self.train_mode:
            master = self._master_view(self, kind)[e]
            return _fp8_linear(x, master, None, self.recipe, pre=(wq[e], ws[e], deq_e))
        return _fp8_linear(x, wq[e], ws[e], self.recipe, w_deq=deq_e)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x [N, H], topk_idx long [N, k], topk_weight [N, k] -> [N, H] (as `Experts.forward`)."""
        n, k = topk_idx.shape
        flat = topk_idx.reshape(-1)
        if self.train_grouped and triton_experts.available(x):
            from miles_fp8.train_experts import grouped_forward

            return grouped_forward(self, x, topk_idx, topk_weight)
        if self.grouped and triton_experts.available(x) and not torch.is_grad_enabled():
            order, dest = expert_order(flat, self.num_experts)
            ys = triton_experts.fp8_experts(
                x, (order // k).to(torch.int32), expert_bounds(flat, self.num_experts),
                self.gate_proj_fp8, self.up_proj_fp8, self.down_proj_fp8,
                self.gate_proj_scale_inv, self.up_proj_scale_inv, self.down_proj_scale_inv,
            )  # fmt: skip
            return combine_copies(ys, order, dest, topk_weight, x.dtype)
        order = flat.argsort(stable=True)
        token = order // k
        xs = x[token]
        prep = self._prepare(x.device)
        outs, start = [], 0
        for e, c in enumerate(torch.bincount(flat, minlength=self.num_experts).tolist()):
            if c == 0:
                continue
            seg = xs[start : start + c]
            h = F.silu(self._linear(seg, "gate_proj", e, prep)) * self._linear(seg, "up_proj", e, prep)
            outs.append(self._linear(h, "down_proj", e, prep))
            start += c
        ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
        ys = ys * topk_weight.reshape(-1)[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

    @torch.no_grad()
    def weight_loader(self, rest: str, tensor: torch.Tensor) -> None:
        """Take ``"{e}.gate_proj.weight"`` (per expert) or ``"gate_up_proj"`` / ``"down_proj"`` (fused)."""
        parts = rest.split(".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1] in self.KINDS and parts[2] == "weight":
            self._load(parts[1], tensor, int(parts[0]))
        elif rest == "gate_up_proj":
            self._load("gate_proj", tensor[:, : self.intermediate])
            self._load("up_proj", tensor[:, self.intermediate :])
        elif rest == "down_proj":
            self._load("down_proj", tensor)
        else:
            raise ValueError(f"Fp8Experts {self.name} has no tensor {rest!r}")

    def _load(self, kind: str, tensor: torch.Tensor, e: int | None = None) -> None:
        label = f"{self.name}.{e}.{kind}.weight" if e is not None else f"{self.name}.{kind}"
        if self.train_mode:
            dst = self._master_view(self, kind)
            (dst if e is None else dst[e]).copy_(tensor)
            return
        q_all, s_all = getattr(self, f"{kind}_fp8"), getattr(self, f"{kind}_scale_inv")
        q_dst, s_dst = (q_all, s_all) if e is None else (q_all[e], s_all[e])
        _check_shape(label, tuple(tensor.shape), tuple(q_dst.shape))
        q, s = quantize(tensor.to(q_all.device), self.recipe.weight_tile, name=label)
        q_dst.copy_(q)
        s_dst.copy_(s)

    def extra_repr(self) -> str:
        mode = "train (master weight, STE)" if self.train_mode else "rollout (fp8 weight)"
        return f"experts={self.num_experts}, recipe={self.recipe.name}, {mode}"


ALWAYS_HIGH_PRECISION = ("gate", "lm_head", "embed_tokens")  # router, output head, embeddings


def is_high_precision(name: str, patterns: list[str] | tuple[str, ...] = ()) -> bool:
    """True if module `name` stays high precision: router/lm_head/embeddings, or it matches a pattern
    (an fnmatch of the full name, e.g. ``model.layers.0.*``, or one dotted component, e.g. ``o_proj``)."""
    from fnmatch import fnmatchcase

    parts = name.split(".")
    if parts[-1] in ALWAYS_HIGH_PRECISION:
        return True
    return any(fnmatchcase(name, p) or p in parts for p in patterns)


def convert_model(model: nn.Module, recipe: Recipe, *, train: bool, keep: tuple[str, ...] = ()) -> list[str]:
    """Swap every eligible ``nn.Linear`` and ``Experts`` of `model` for its FP8 module; returns names."""
    from miles_core.api import swap_modules

    def fn(name: str, mod: nn.Module) -> nn.Module | None:
        if is_high_precision(name, keep):
            return None
        if type(mod) is nn.Linear:
            return Fp8Linear(mod, recipe, train=train, name=name)
        if isinstance(mod, Experts):
            return Fp8Experts(mod, recipe, train=train, name=name)
        return None

    return swap_modules(model, fn)


def fp8_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Fp8Linear, Fp8Experts))]


__all__ = [
    "FP8_DTYPE",
    "Fp8Experts",
    "Fp8Linear",
    "convert_model",
    "fp8_mm",
    "fp8_modules",
    "is_high_precision",
]
