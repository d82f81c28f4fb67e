"""miles-int4qat hook implementations: the ``int4`` flags, fake-quant swaps for training, packed INT4 swaps
for the rollout engine, INT4 memory metrics, and ``miles convert --to int4``.

Only hookimpls live here; the work is in `miles_int4qat.modules` / `checkpoint` (imported lazily, so an
idle plugin costs nothing). An active run registers its own `Int4Run` (the bytes measured at the swap).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from miles_core import UsageError, hookimpl

DEFAULT_GROUP_SIZE = 128
# miles' environment switches for INT4 QAT: here flags decide, so a set variable is refused, not ignored.
LEGACY_ENV = ("OPEN_TRAINING_INT4_FAKE_QAT_FLAG", "OPEN_TRAINING_INT4_GROUP_SIZE")


def _add_common(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--int4-group-size",
        type=int,
        default=None,
        help=f"Weights per INT4 scale along the input dimension (default {DEFAULT_GROUP_SIZE}); must "
        "divide every quantized input dimension.",
    )
    group.add_argument(
        "--int4-scope",
        choices=("experts", "all-linear"),
        default="experts",
        help="What is quantized: the routed-expert weights (default) or every linear layer except the "
        "router and lm_head.",
    )


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "int4", "INT4 quantization-aware training and INT4 rollout (miles-int4qat)."
    )
    group.add_argument(
        "--int4-qat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Train with per-group symmetric INT4 fake quantization (straight-through gradient) and roll "
        "out with packed INT4 weights. Implies --int4-rollout.",
    )
    group.add_argument(
        "--int4-rollout",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Roll out with packed INT4 weights, re-quantized at every weight sync, without QAT (baseline).",
    )
    _add_common(group)
    group.add_argument(
        "--int4-kernel",
        choices=("auto", "tinygemm", "dequant"),
        default="auto",
        help="INT4 matmul of the engine: tinygemm (torch._weight_int4pack_mm, CUDA bf16), dequant "
        "(dequantize per call, any device), or auto (tinygemm where it applies; on CUDA with triton the "
        "MoE experts run grouped Triton W4A16 kernels, CUDA-graph capturable). tinygemm and dequant keep "
        "the experts on a per-expert loop, which syncs with the host (no CUDA graphs).",
    )


@hookimpl
def configure(args: argparse.Namespace, pm: Any) -> bool:
    legacy = [v for v in LEGACY_ENV if os.environ.get(v)]
    if legacy:
        raise UsageError(
            f"{', '.join(legacy)} is set, but miles-int4qat is switched by flags only; unset it and pass "
            "--int4-qat / --int4-group-size N instead."
        )
    if args.int4_qat:
        args.int4_rollout = True
    if args.int4_group_size is None:
        args.int4_group_size = DEFAULT_GROUP_SIZE
    g = args.int4_group_size
    if g <= 0 or g % 8:
        raise UsageError(f"--int4-group-size {g} is not a positive multiple of 8; pass e.g. 32, 64 or 128.")
    if args.int4_rollout and args.true_on_policy_mode:
        raise UsageError(
            "--int4-qat / --int4-rollout run INT4 kernels that are not batch-invariant, so "
            "--true-on-policy-mode could not keep rollout and training log-probs bitwise equal; drop one."
        )
    if args.int4_rollout:
        pm.register(Int4Run(args), name="int4qat.run")
    return args.int4_rollout


class Int4Run:
    """The hooks of one run with INT4 on: the module swaps and the rollout weight-memory metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bytes: dict[str, float] = {}  # int4 / bf16 bytes of the quantized scope, measured at the swap

    @hookimpl
    def configure_model(self, model: Any, role: str) -> None:
        from miles_int4qat import modules

        args = self.args
        scope, g = args.int4_scope, args.int4_group_size
        if role == "rollout":
            bf16_bytes = 2 * modules.scope_weight_numel(model, scope)
            modules.quantize_for_rollout(model, scope, g, kind=args.int4_kernel)
            self._requantize_from_masters(model, scope)
            self.bytes = {
                "int4/rollout_weight_bytes": modules.int4_bytes(model),
                "int4/bf16_weight_bytes": bf16_bytes,
            }
        elif role in ("train", "ref") and args.int4_qat:
            modules.fake_quantize_for_training(model, scope, g)

    def _requantize_from_masters(self, model: Any, scope: str) -> None:
        """Quantize rollout 0's weights from the checkpoint's full-precision tensors, as every later weight
        sync does from the trainer's fp32 masters: the engine model arrives already cast to the rollout
        dtype, and INT4 values rounded from bf16 weights differ from those the QAT trainer's fake quant
        computes."""
        import torch

        if next(model.parameters()).dtype == torch.float32:
            return
        from miles_core.api import load_hf_tensors, start_weights
        from miles_int4qat.checkpoint import iter_scope_tensors

        src = start_weights(self.args)
        if src and os.path.isfile(os.path.join(src, "config.json")):
            load_hf_tensors(model, iter_scope_tensors(src, scope))

    @hookimpl
    def rollout_metrics(self) -> dict:
        return dict(self.bytes)


# ------------------------------------------------------------------------------------ miles convert


@hookimpl
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("int4", "--to int4 (miles-int4qat): compressed-tensors pack-quantized.")
    _add_common(group)


@hookimpl
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    from miles_int4qat import checkpoint

    if args.to == "int4":
        checkpoint.export_int4(
            input_dir, output_dir, args.int4_group_size or DEFAULT_GROUP_SIZE, args.int4_scope
        )
        return True
    if args.to == "bf16" and checkpoint.int4_group_size(input_dir) is not None:
        checkpoint.import_int4(input_dir, output_dir)
        return True
    return None
