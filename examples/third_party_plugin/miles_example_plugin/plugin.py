"""The example package's hooks: the ``--exact-number-tolerance`` flag and two rollout metrics.

Registered under ``miles.plugins`` as ``example``. A reward or generate function alone needs no plugin;
this shows how a package adds its own flags (in its own argument group) and, for a run that uses its
functions, registers a per-run object with its metrics hook.
"""

from __future__ import annotations

import argparse
from typing import Any

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
def configure(args: argparse.Namespace, pm: Any) -> bool:
    if args.exact_number_tolerance < 0:
        raise UsageError("--exact-number-tolerance must be >= 0 (0 means exactly equal).")
    active = args.rm_type == "exact_number" or args.custom_generate_function_path == "single_turn_stats"
    if active:  # the run's hooks live on an object registered for this run only
        pm.register(ExampleRun(), name="example.run")
    return active


class ExampleRun:
    """The hooks of a run that uses this package's reward or generate function."""

    @hookimpl
    def rollout_metrics(self, samples: list[Sample]) -> dict | None:
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
