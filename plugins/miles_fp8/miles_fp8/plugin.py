"""miles-fp8 hook implementations: the ``fp8`` flags, FP8 modules swapped into the engine (and, for
unified FP8, into the policy and reference model), FP8 scale statistics, and ``miles convert --to fp8``.

Only hookimpls live here; the work is in `miles_fp8.linear`, `.stats` and `.checkpoint`, imported lazily
so an idle plugin costs nothing. An active run registers its own `Fp8Run`. The rollout engine
re-quantizes at every weight sync through the FP8 modules' ``weight_loader``, so the engine never holds
a high-precision copy of the quantized weights.
"""

from __future__ import annotations

import argparse
from typing import Any

from miles_core import Sample, UsageError, hookimpl


def mode(args: argparse.Namespace) -> str | None:
    """``"unified"``, ``"rollout_only"`` or ``None`` (plugin idle)."""
    if args.fp8_rollout_only:
        return "rollout_only"
    return "unified" if args.fp8_recipe else None


def _recipe(args: argparse.Namespace):
    from miles_fp8.quant import get_recipe

    return get_recipe(args.fp8_recipe or "blockwise")


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fp8", "Unified FP8 training and rollout (miles-fp8).")
    g.add_argument("--fp8-format", choices=["e4m3"], default="e4m3", help="FP8 element format (e4m3fn).")
    g.add_argument(
        "--fp8-recipe",
        choices=["blockwise", "rowwise", "tensorwise"],
        default=None,
        help="Turn on unified FP8: the rollout engine and the training forward (policy and reference) use "
        "the same quantization. blockwise = 128x128 weight blocks and 1x128 activation tiles (DeepSeek-V3 "
        "/ Qwen3-FP8); rowwise = one scale per weight row and per token; tensorwise = one scale per tensor.",
    )
    g.add_argument(
        "--fp8-rollout-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="FP8 rollout with high-precision training (the mismatched baseline); uses --fp8-recipe, "
        "default blockwise.",
    )
    g.add_argument(
        "--extra-high-precision-layers",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="Modules kept in high precision besides the router (gate), lm_head and embed_tokens, which "
        "always are: a full-name fnmatch pattern (model.layers.0.*) or a name component (o_proj).",
    )
    g.add_argument(
        "--fp8-triton",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Quantize activations and weights with the fused Triton kernel on CUDA (rowwise and 1x128 "
        "tiles, bit-identical to the eager path); --no-fp8-triton forces the eager PyTorch quantization. "
        "The blockwise Triton GEMMs quantize their activations inside the kernel either way.",
    )
    g.add_argument(
        "--fp8-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the eager quantization's amax and encode passes on CUDA (used only if a probe "
        "matches the eager result bit for bit; slower than eager as of torch 2.11).",
    )
    g.add_argument(
        "--fp8-stats-interval",
        type=int,
        default=1,
        help="Log FP8 weight statistics (amax, saturated/underflow fraction) every N optimizer steps and "
        "rollouts; 0 turns them off.",
    )


@hookimpl
def configure(args: argparse.Namespace, pm: Any) -> bool:
    m = mode(args)
    if m is None:
        return False
    if args.true_on_policy_mode:
        flag = "--fp8-rollout-only" if m == "rollout_only" else "--fp8-recipe"
        raise UsageError(
            f"{flag} runs FP8 kernels that are not batch-invariant, so --true-on-policy-mode could not keep "
            "rollout and training log-probs bitwise equal; drop one of the two flags."
        )
    if args.rollout_backend != "torch":
        raise UsageError(
            "miles-fp8 swaps layers of the built-in engine, not of --rollout-backend "
            f"{args.rollout_backend}; use --rollout-backend torch or the backend's own FP8 option."
        )
    if args.hf_checkpoint:
        from miles_fp8.checkpoint import is_fp8_checkpoint

        if is_fp8_checkpoint(args.hf_checkpoint):
            hf = args.hf_checkpoint
            raise UsageError(
                f"--hf-checkpoint {hf} is an FP8 checkpoint and training needs master weights; run "
                f"`miles convert --hf-checkpoint {hf} --output OUT --to bf16` and train from OUT."
            )
    pm.register(Fp8Run(args, m), name="fp8.run")
    return True


class Fp8Run:
    """The hooks of one run with FP8 on: module swaps, and FP8 weight statistics."""

    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        self.mode, self.every = mode, args.fp8_stats_interval
        self.keep = tuple(args.extra_high_precision_layers or ())
        self.rollout_stats: dict[str, float] = {}  # engine weight stats of the latest rollout
        self.configure(args)

    def configure(self, args: argparse.Namespace) -> None:
        from miles_fp8.quant import configure_kernels

        configure_kernels(compile=args.fp8_compile, triton=args.fp8_triton)
        self.recipe = _recipe(args)

    def _due(self, n: int) -> bool:
        return bool(self.every) and n % self.every == 0

    @hookimpl
    def configure_model(self, model: Any, role: str) -> None:
        if role != "rollout" and self.mode != "unified":
            return
        from miles_fp8.linear import convert_model

        convert_model(model, self.recipe, train=role != "rollout", keep=self.keep)

    @hookimpl
    def pre_rollout(self, rollout_id: int, engine: Any) -> None:
        self.rollout_stats = {}
        if self._due(rollout_id) and hasattr(engine, "model"):
            from miles_fp8.stats import model_weight_stats

            self.rollout_stats = model_weight_stats(engine.model, "fp8/rollout_weight_")

    @hookimpl
    def rollout_metrics(self, samples: list[Sample]) -> dict:
        return dict(self.rollout_stats)

    @hookimpl
    def post_step(self, step: int, model: Any, metrics: dict) -> None:
        if self.mode == "unified" and self._due(step):
            from miles_fp8.stats import model_weight_stats

            metrics.update(model_weight_stats(model, "fp8/train_weight_"))


@hookimpl
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("fp8", "miles-fp8: --to fp8 (quantize) and --to bf16|fp32 (dequantize).")
    g.add_argument(
        "--extra-high-precision-layers",
        nargs="*",
        default=[],
        metavar="PATTERN",
        help="With --to fp8: modules to leave unquantized besides gate, lm_head and embed_tokens.",
    )


@hookimpl
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    to = args.to
    if to == "fp8":
        from miles_fp8.checkpoint import convert_to_fp8

        convert_to_fp8(input_dir, output_dir, keep=args.extra_high_precision_layers or ())
        return True
    if to in ("bf16", "fp32"):
        from miles_fp8.checkpoint import convert_from_fp8, is_fp8_checkpoint

        if not is_fp8_checkpoint(input_dir):
            return None  # not ours: another plugin may convert plain checkpoints to bf16
        import torch

        convert_from_fp8(input_dir, output_dir, torch.bfloat16 if to == "bf16" else torch.float32)
        return True
    return None
