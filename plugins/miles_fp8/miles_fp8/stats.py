"""FP8 scale statistics for logging: amax, saturated fraction, underflow fraction, quantization error.

`saturated` counts encoded values at +-448 (the top of the e4m3 range). With scales taken from each
tile's own amax that is about one value per tile by construction; a larger share means the scales were
stale (e.g. loaded with a checkpoint) and values were clipped. `underflow` counts non-zero values that
encoded to zero, the other way FP8 loses information.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_fp8.quant import FP8_MAX, dequantize


@dataclass
class Fp8Stats:
    """Running totals over the tensors of one model; `as_metrics` turns them into logged floats."""

    amax: float = 0.0
    numel: int = 0
    saturated: int = 0
    underflow: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def add(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, tile: tuple[int, int]) -> None:
        """Account one tensor `x` and its encoding `(q, scale)` (as returned by `quantize`)."""
        x = x.detach().float()
        qf = q.float()
        self.amax = max(self.amax, float(x.abs().max())) if x.numel() else self.amax
        self.numel += x.numel()
        self.saturated += int((qf.abs() == FP8_MAX).sum())
        self.underflow += int(((qf == 0) & (x != 0)).sum())
        err = dequantize(q, scale, tile) - x
        self.err_sq += float(err.pow(2).sum())
        self.ref_sq += float(x.pow(2).sum())

    def as_metrics(self, prefix: str) -> dict[str, float]:
        n = max(self.numel, 1)
        return {
            f"{prefix}amax": self.amax,
            f"{prefix}saturated_frac": self.saturated / n,
            f"{prefix}underflow_frac": self.underflow / n,
            f"{prefix}rel_rmse": (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq > 0 else 0.0,
        }


def _weights(module: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, scale) pairs of an FP8 module: master weights with scale None, or FP8 weights + scales."""
    from miles_fp8.linear import Fp8Experts

    if isinstance(module, Fp8Experts):
        if module.train_mode:
            return [(module._master_view(module, k), None) for k in module.KINDS]
        return [(getattr(module, f"{k}_fp8"), getattr(module, f"{k}_scale_inv")) for k in module.KINDS]
    return [(module.weight, None if module.train_mode else module.weight_scale_inv)]


@torch.no_grad()
def model_weight_stats(model: torch.nn.Module, prefix: str) -> dict[str, float]:
    """Stats over every FP8 module of `model`: master weights are quantized here as the forward would;
    engine (FP8) weights are read as stored, amax recovered as ``max|q| * scale``."""
    from miles_fp8.linear import fp8_modules
    from miles_fp8.quant import quantize

    stats, stored_amax = Fp8Stats(), 0.0
    for _, mod in fp8_modules(model):
        tile = mod.recipe.weight_tile
        for w, scale in _weights(mod):
            if scale is None:
                q, s = quantize(w, tile)
                stats.add(w, q, s, tile)
            else:
                stored_amax = max(stored_amax, float(dequantize(w, scale, tile).abs().max()))
                stats.numel += w.numel()
                stats.saturated += int((w.float().abs() == FP8_MAX).sum())
    metrics = stats.as_metrics(prefix)
    if stats.ref_sq == 0:  # stored FP8 weights: no master copy to measure error or underflow against
        metrics = {
            f"{prefix}amax": stored_amax,
            f"{prefix}saturated_frac": metrics[f"{prefix}saturated_frac"],
        }
    return metrics
