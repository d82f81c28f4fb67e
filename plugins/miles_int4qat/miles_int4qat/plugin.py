"""miles-int4qat hook implementations: the ``int4`` flags, fake-quant swaps for training, packed INT4 swaps
for the rollout engine, INT4 memory metrics, and ``miles convert --to int4``.

Only hookimpls live here; the work is in `miles_int4qat.modules` / `checkpoint` (imported lazily, so an
idle plugin costs nothing). Run state (the bytes measured at the swap) is a module-level dict reset by
`configure`, never on ``args``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from miles_core import UsageError, hookimpl

QAT_ENV = "OPEN_TRAINING_INT4_FAKE_QAT_FLAG"
GROUP_ENV = "OPEN_TRAINING_INT4_GROUP_SIZE"
DEFAULT_GROUP_SIZE = 128
_state: dict[str, Any] = {}


def _add_common(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--int4-group-size",
        type=int,
        default=None,
        help=f"Weights per INT4 scale along the input dimension (default {DEFAULT_GROUP_SIZE}, or "
        f"${GROUP_ENV}); must divide every quantized input dimension.",
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
        action="store_true",
        default=False,
        help=f"Train with per-group symmetric INT4 fake quantization (straight-through gradient) and roll "
        f"out with packed INT4 weights; same as {QAT_ENV}=1. Implies --int4-rollout.",
    )
    group.add_argument(
        "--int4-rollout",
        action="store_true",
        default=False,
        help="Roll out with packed INT4 weights, re-quantized at every weight sync, without QAT (baseline).",
    )
    _add_common(group)
    group.add_argument(
        "--int4-kernel",
        choices=("auto", "tinygemm", "dequant"),
        default="auto",
        help="INT4 matmul of the engine: tinygemm (torch._weight_int4pack_mm, CUDA bf16), dequant "
        "(dequantize per call, any device), or auto (tinygemm where it applies).",
    )


def _env_group_size() -> int | None:
    raw = os.environ.get(GROUP_ENV)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"{GROUP_ENV}={raw!r} is not an integer; set it to a group size such as 128."
        ) from None


def _active(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "int4_qat", False) or getattr(args, "int4_rollout", False))


@hookimpl
def configure(args: argparse.Namespace) -> bool:
    _state.clear()
    if os.environ.get(QAT_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        args.int4_qat = True
    if getattr(args, "int4_qat", False):
        args.int4_rollout = True
    if getattr(args, "int4_group_size", None) is None:
        args.int4_group_size = _env_group_size() or DEFAULT_GROUP_SIZE
    g = args.int4_group_size
    if g <= 0 or g % 8:
        raise UsageError(f"--int4-group-size {g} is not a positive multiple of 8; pass e.g. 32, 64 or 128.")
    return _active(args)


@hookimpl
def configure_model(args: argparse.Namespace, model: Any, role: str) -> None:
    if not _active(args):
        return
    from miles_int4qat import modules

    scope, g = args.int4_scope, args.int4_group_size
    if role == "rollout":
        bf16_bytes = 2 * modules.scope_weight_numel(model, scope)
        modules.quantize_for_rollout(model, scope, g, kind=getattr(args, "int4_kernel", "auto"))
        _requantize_from_masters(args, model, scope)
        _state.update(bf16_bytes=bf16_bytes, int4_bytes=modules.int4_bytes(model))
    elif role in ("train", "ref") and args.int4_qat:
        modules.fake_quantize_for_training(model, scope, g)


def _requantize_from_masters(args: argparse.Namespace, model: Any, scope: str) -> None:
    """Quantize rollout 0's weights from the checkpoint's full-precision tensors, as every later weight
    sync does from the trainer's fp32 masters: the engine model arrives already cast to the rollout dtype,
    and INT4 values rounded from bf16 weights differ from those the QAT trainer's fake quant computes."""
    import torch

    if next(model.parameters()).dtype == torch.float32:
        return
    from miles_core.model import load_hf_tensors
    from miles_core.train.checkpoint import latest_checkpoint
    from miles_int4qat.checkpoint import iter_scope_tensors

    resume = latest_checkpoint(getattr(args, "load", None))
    src = resume / "model" if resume else getattr(args, "hf_checkpoint", None)
    if src and os.path.isfile(os.path.join(src, "config.json")):
        load_hf_tensors(model, iter_scope_tensors(src, scope))


@hookimpl
def pre_rollout(args: argparse.Namespace, rollout_id: int, engine: Any) -> None:
    if not _active(args) or not getattr(engine, "cuda_graph", False):
        return
    from miles_int4qat.modules import uses_host_sync

    if uses_host_sync(engine.model):
        # The INT4 expert loop syncs with the host once per layer; capturing it would fail, so decode
        # runs eagerly (see the README's limits: a graph-capturable grouped INT4 kernel is future work).
        engine.cuda_graph = False
        engine.reset_graphs()


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list) -> dict | None:
    if not _active(args) or "int4_bytes" not in _state:
        return None
    return {"int4/rollout_weight_bytes": _state["int4_bytes"], "int4/bf16_weight_bytes": _state["bf16_bytes"]}


# ------------------------------------------------------------------------------------ miles convert


@hookimpl
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("int4", "--to int4 (miles-int4qat): compressed-tensors pack-quantized.")
    _add_common(group)


@hookimpl
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    from miles_int4qat import checkpoint

    if args.to == "int4":
        g = getattr(args, "int4_group_size", None) or _env_group_size() or DEFAULT_GROUP_SIZE
        checkpoint.export_int4(input_dir, output_dir, g, getattr(args, "int4_scope", "experts"))
        return True
    if args.to == "bf16" and checkpoint.int4_group_size(input_dir) is not None:
        checkpoint.import_int4(input_dir, output_dir)
        return True
    return None
