"""miles-fp8 hook implementations: the ``fp8`` flags, FP8 modules swapped into the engine (and, for
unified FP8, into the policy and reference model), FP8 scale statistics, and ``miles convert --to fp8``.

Only hookimpls live here; the work is in `miles_fp8.linear`, `.stats` and `.checkpoint`, imported lazily
so an idle plugin costs nothing. The rollout engine re-quantizes at every weight sync through the FP8
modules' ``weight_loader`` (``Engine.update_weights`` -> ``load_hf_tensors``), so no post_weight_sync is
needed and the engine never holds a high-precision copy of the quantized weights.
"""

from __future__ import annotations

import argparse
from typing import Any

from miles_core import Sample, UsageError, hookimpl

_rollout_stats: dict[str, float] = {}  # engine weight stats of the latest rollout (set in pre_rollout)


def mode(args: argparse.Namespace) -> str | None:
    """``"unified"``, ``"rollout_only"`` or ``None`` (plugin idle)."""
    if getattr(args, "fp8_rollout_only", False):
        return "rollout_only"
    return "unified" if getattr(args, "fp8_recipe", None) else None


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
        action="store_true",
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
        "--fp8-stats-interval",
        type=int,
        default=1,
        help="Log FP8 weight statistics (amax, saturated/underflow fraction) every N optimizer steps and "
        "rollouts; 0 turns them off.",
    )


@hookimpl
def configure(args: argparse.Namespace) -> bool:
    global _rollout_stats
    _rollout_stats = {}
    m = mode(args)
    if m is None:
        return False
    if m == "rollout_only" and getattr(args, "true_on_policy_mode", False):
        raise UsageError(
            "--fp8-rollout-only makes rollout and training numerics differ, which --true-on-policy-mode "
            "forbids; use --fp8-recipe (unified FP8) instead or drop one of the two flags."
        )
    backend = getattr(args, "rollout_backend", "torch")
    if backend not in (None, "torch"):
        raise UsageError(
            f"miles-fp8 swaps layers of the built-in engine, not of --rollout-backend {backend}; use "
            "--rollout-backend torch or the backend's own FP8 option."
        )
    hf = getattr(args, "hf_checkpoint", None)
    if hf:
        from miles_fp8.checkpoint import is_fp8_checkpoint

        if is_fp8_checkpoint(hf):
            raise UsageError(
                f"--hf-checkpoint {hf} is an FP8 checkpoint and training needs master weights; run "
                f"`miles convert --hf-checkpoint {hf} --output OUT --to bf16` and train from OUT."
            )
    return True


@hookimpl
def configure_model(args: argparse.Namespace, model: Any, role: str) -> None:
    m = mode(args)
    if m is None or (role != "rollout" and m != "unified"):
        return
    from miles_fp8.linear import convert_model

    keep = tuple(args.extra_high_precision_layers or ())
    convert_model(model, _recipe(args), train=role != "rollout", keep=keep)


def _stats_due(args: argparse.Namespace, n: int) -> bool:
    every = getattr(args, "fp8_stats_interval", 1)
    return bool(every) and n % every == 0


@hookimpl
def pre_rollout(args: argparse.Namespace, rollout_id: int, engine: Any) -> None:
    global _rollout_stats
    _rollout_stats = {}
    if mode(args) and getattr(engine, "cuda_graph", False):
        from miles_fp8.linear import uses_host_sync

        if uses_host_sync(engine.model):
            # Fp8Experts sizes its per-expert loop on the host (one sync per layer), which a CUDA graph
            # cannot capture, so the engine decodes eagerly (README, limits).
            engine.cuda_graph = False
            engine.reset_graphs()
    if mode(args) and _stats_due(args, rollout_id) and hasattr(engine, "model"):
        from miles_fp8.stats import model_weight_stats

        _rollout_stats = model_weight_stats(engine.model, "fp8/rollout_weight_")


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    return dict(_rollout_stats) if mode(args) else None


@hookimpl
def post_step(args: argparse.Namespace, step: int, model: Any, metrics: dict) -> None:
    if mode(args) == "unified" and _stats_due(args, step):
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
    to = getattr(args, "to", None)
    if to == "fp8":
        from miles_fp8.checkpoint import convert_to_fp8

        convert_to_fp8(input_dir, output_dir, keep=getattr(args, "extra_high_precision_layers", None) or ())
        return True
    if to in ("bf16", "fp32"):
        from miles_fp8.checkpoint import convert_from_fp8, is_fp8_checkpoint

        if not is_fp8_checkpoint(input_dir):
            return None  # not ours: another plugin may convert plain checkpoints to bf16
        import torch

        convert_from_fp8(input_dir, output_dir, torch.bfloat16 if to == "bf16" else torch.float32)
        return True
    return None
