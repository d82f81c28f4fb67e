"""The example package's hooks: the ``--exact-number-tolerance`` flag and two rollout metrics.

Registered under ``miles.plugins`` as ``example``. A reward or generate function alone needs no plugin;
this shows how a package adds its own flags (in its own argument group) and metrics when it wants them.
"""

from __future__ import annotations

import argparse

from miles_core import Sample, UsageError, hookimpl


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("example", "miles-example-plugin (exact_number, single_turn_stats)")
    group.add_argument(
        "--exact-number-tolerance",
        type=float,
        default=0.0,
        help="exact_number: largest absolute difference from the label that still scores 1.",
    )


@hookimpl
def configure(args: argparse.Namespace) -> bool:
    if getattr(args, "exact_number_tolerance", 0.0) < 0:
        raise UsageError("--exact-number-tolerance must be >= 0 (0 means exactly equal).")
    uses_reward = getattr(args, "rm_type", None) == "exact_number"
    uses_generate = getattr(args, "custom_generate_function_path", None) == "single_turn_stats"
    return uses_reward or uses_generate


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    """Logged as ``rollout/example/...``: how many samples each of this package's functions handled."""
    if not samples:
        return None
    n = len(samples)
    return {
        "example/generated_frac": sum("example" in s.metadata for s in samples) / n,
        "example/scored_frac": sum("exact_number_pred" in s.metadata for s in samples) / n,
        "example/number_found_frac": sum(s.metadata.get("exact_number_pred") is not None for s in samples)
        / n,
    }
