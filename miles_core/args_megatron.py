"""Flags of the Megatron-core train backend (``--train-backend megatron``), in Megatron-LM's names.

The model-parallel sizes themselves are cluster flags (`miles_core.args`); this module adds the
Megatron-only ones and `check_parallel_args`, which refuses what no backend runs yet: sizes above 1 need
one trainer process per rank, which no backend launches yet (the megatron backend converts and shards
weights for them, `miles_core.megatron.weights`, but trains in one process).
"""

from __future__ import annotations

import argparse
import importlib.util

from miles_core.errors import UsageError

ON_OFF = argparse.BooleanOptionalAction
PARALLEL_SIZES = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
)

MEGATRON_ONLY = ("sequence_parallel", "use_distributed_optimizer", "recompute_method", "recompute_num_layers")


def add_megatron(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("megatron (--train-backend megatron: pip install 'miles-core[megatron]')")
    g.add_argument(
        "--sequence-parallel",
        action=ON_OFF,
        default=False,
        help="Split norms' and dropouts' activations along the sequence over tensor-parallel ranks.",
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action=ON_OFF,
        default=False,
        help="Shard optimizer state and fp32 masters over data-parallel ranks (Megatron's ZeRO-1).",
    )
    g.add_argument(
        "--recompute-method",
        choices=["uniform", "block"],
        default=None,
        help="With --recompute-granularity full: 'uniform' recomputes groups of --recompute-num-layers "
        "layers, 'block' the first --recompute-num-layers layers of each pipeline stage.",
    )
    g.add_argument(
        "--recompute-num-layers",
        type=int,
        default=None,
        help="Layers per recompute group (uniform) or recomputed layers per stage (block).",
    )


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_parallel_args(args: argparse.Namespace) -> None:
    """Refuse model-parallel sizes and Megatron-only flags the chosen backend cannot run, each with one
    sentence; with --train-backend megatron, refuse early when megatron-core is missing."""
    for dest in PARALLEL_SIZES:
        if vars(args)[dest] != 1:
            raise UsageError(
                f"{_flag(dest)} {vars(args)[dest]} needs one trainer process per model-parallel rank, which "
                "no train backend launches yet (--train-backend megatron trains in one process); use 1."
            )
    if args.train_backend != "megatron":
        for dest in MEGATRON_ONLY:
            if vars(args)[dest] not in (None, False):
                raise UsageError(
                    f"{_flag(dest)} is read only by --train-backend megatron; drop it or use that backend."
                )
        return
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise UsageError(
            "--train-backend megatron needs megatron-core, which is not installed; install it with "
            "pip install 'miles-core[megatron]'."
        )
    if args.sequence_parallel:
        raise UsageError(
            "--sequence-parallel splits activations over tensor-parallel ranks, so it needs "
            "--tensor-model-parallel-size above 1, which is not launched yet; drop it."
        )
    if args.use_distributed_optimizer:
        raise UsageError(
            "--use-distributed-optimizer shards the optimizer over data-parallel ranks, but --train-backend "
            "megatron trains in one process for now; drop it."
        )
    full = args.recompute_granularity == "full"
    if full and (args.recompute_method is None or args.recompute_num_layers is None):
        raise UsageError(
            "--recompute-granularity full with --train-backend megatron needs --recompute-method "
            "uniform|block and --recompute-num-layers N (as in Megatron-LM); add both."
        )
    if not full and (args.recompute_method is not None or args.recompute_num_layers is not None):
        raise UsageError(
            "--recompute-method/--recompute-num-layers apply to --recompute-granularity full; add it or "
            "drop them."
        )
    if args.recompute_num_layers is not None and args.recompute_num_layers < 1:
        raise UsageError(f"--recompute-num-layers must be at least 1, got {args.recompute_num_layers}.")


def check_megatron_args(args: argparse.Namespace) -> None:
    """What `MegatronTrainer` refuses beyond `check_parallel_args` (flags of the built-in model only)."""
    if args.train_compile:
        raise UsageError(
            "--train-compile compiles the built-in model's decoder layers, not Megatron's; drop it with "
            "--train-backend megatron."
        )
