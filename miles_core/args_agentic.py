"""The `miles train` flags of agentic rollouts: the tool-calling generate function (``--max-turns``,
``--tools``, the Python sandbox's limits) and ``--rollout-function-path`` (slime's custom rollout function).
Part of `miles_core.args`; `check_agentic_args` runs from `miles_core.validate.validate`.
"""

from __future__ import annotations

import argparse

from miles_core import drivers
from miles_core.errors import UsageError


def add_agentic(p: argparse.ArgumentParser) -> None:
    """Add the rollout-function flag to the rollout family and the tool family."""
    rollout = next(g for g in p._action_groups if g.title == "rollout")
    rollout.add_argument(
        "--rollout-function-path",
        default=None,
        help="Replace the whole rollout with your function (slime's signature): "
        "generate_rollout(args, rollout_id, data_source, evaluation=False) returning list[list[Sample]] "
        "(groups) or an object with .samples (and .metrics); sync or async. file.py[:func], pkg.mod:func "
        "or pkg.mod.func. Default: the built-in rollout (miles_core.rollout.rollout_fn.generate_rollout).",
    )
    g = p.add_argument_group("tools", "Multi-turn tool use (--custom-generate-function-path tool_call).")
    g.add_argument(
        "--max-turns",
        type=int,
        default=4,
        help="Most assistant turns per sample; every turn but the last may call tools (tool_call).",
    )
    g.add_argument(
        "--tools",
        nargs="+",
        default=["python"],
        metavar="NAME",
        help="Tools the model may call, by name in the miles.tools entry-point group (tool_call).",
    )
    g.add_argument(
        "--tool-timeout",
        type=float,
        default=5.0,
        help="Seconds of wall time a Python tool call may take before it is killed.",
    )
    g.add_argument(
        "--tool-memory-mb",
        type=int,
        default=512,
        help="Address-space limit (RLIMIT_AS) of the Python tool's process, in MiB.",
    )
    g.add_argument(
        "--tool-max-output-chars",
        type=int,
        default=1000,
        help="Characters of a tool's output shown to the model; the rest is cut off with a note.",
    )


def check_agentic_args(args: argparse.Namespace) -> None:
    """Refuse agentic flag values the rollout cannot run, each with one sentence."""
    if args.max_turns < 1:
        raise UsageError(f"--max-turns {args.max_turns} leaves the model no turn; use 1 or more.")
    if args.tool_timeout <= 0:
        raise UsageError(f"--tool-timeout {args.tool_timeout} must be positive; use e.g. 5.")
    if args.tool_memory_mb < 64:
        raise UsageError(
            f"--tool-memory-mb {args.tool_memory_mb} is below the 64 MiB a Python process needs to start; "
            "use 64 or more."
        )
    if args.tool_max_output_chars < 1:
        raise UsageError(f"--tool-max-output-chars {args.tool_max_output_chars} must be at least 1.")
    if args.custom_generate_function_path == "tool_call":  # other generate functions may not read --tools
        installed = drivers.available(drivers.TOOLS)
        for name in args.tools:
            if name not in installed:
                raise UsageError(f"unknown --tools {name!r}; installed: {', '.join(installed) or 'none'}.")
    if args.rollout_function_path and (
        args.dynamic_sampling_filter_path is not None or args.over_sampling_batch_size is not None
    ):
        raise UsageError(
            "--rollout-function-path replaces the built-in rollout, which is what --dynamic-sampling-filter-"
            "path / --over-sampling-batch-size configure; filter inside your rollout function instead."
        )
