"""The miles-rewards plugin: its flags and its checks. Reward functions live in their own modules.

Registered under ``miles.plugins`` as ``rewards``; the rewards themselves are entry points of the
``miles.rewards`` group, loaded by name when ``--rm-type`` asks for one, so nothing heavy is imported here.
With ``--overlong-buffer-len`` the run registers an `OverlongRun` (DAPO's overlong penalty).
"""

from __future__ import annotations

import argparse
import importlib.metadata
from typing import Any

from miles_core import Sample, UsageError, hookimpl


def reward_names() -> set[str]:
    """The ``--rm-type`` names this distribution registers (its ``miles.rewards`` entry points)."""
    return {
        ep.name
        for ep in importlib.metadata.entry_points(group="miles.rewards")
        if ep.module.startswith(__package__)
    }


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("rewards", "built-in reward functions (miles-rewards)")
    group.add_argument(
        "--rm-url",
        default=None,
        help="URL of the reward server that --rm-type remote_rm POSTs each sample to.",
    )
    group.add_argument(
        "--rm-max-retries",
        type=int,
        default=3,
        help="remote_rm: retries after a connection error, timeout or HTTP 5xx (attempts = retries + 1).",
    )
    group.add_argument(
        "--rm-retry-backoff",
        type=float,
        default=0.5,
        help="remote_rm: seconds before the first retry; doubles on each further retry.",
    )
    group.add_argument(
        "--rm-request-timeout", type=float, default=30.0, help="remote_rm: seconds to wait for one answer."
    )
    group.add_argument(
        "--math-equivalence-timeout",
        type=float,
        default=2.0,
        help="math/deepscaler: seconds one sympy equivalence check may take; a timeout counts as not equal.",
    )
    group.add_argument(
        "--overlong-buffer-len",
        type=int,
        default=None,
        help="DAPO overlong penalty: the last N tokens of --rollout-max-response-len over which the penalty "
        "grows linearly from 0 to --overlong-penalty-factor (off when unset).",
    )
    group.add_argument(
        "--overlong-penalty-factor",
        type=float,
        default=1.0,
        help="DAPO overlong penalty: what a response that uses the whole length budget loses.",
    )


@hookimpl
def configure(args: argparse.Namespace, pm: Any) -> bool:
    rm_type = args.rm_type or ""
    if rm_type == "remote_rm" and not args.rm_url:
        raise UsageError("--rm-type remote_rm needs --rm-url http://host:port/path of the reward server.")
    _check_remote(args)
    if args.math_equivalence_timeout <= 0:
        raise UsageError("--math-equivalence-timeout must be a positive number of seconds (default 2.0).")
    overlong = _check_overlong(args)
    if overlong:
        pm.register(OverlongRun(args), name="rewards.overlong")
    name = rm_type[len("boxed_") :] if rm_type.startswith("boxed_") else rm_type
    return name in reward_names() or overlong


def _check_remote(args: argparse.Namespace) -> None:
    from miles_rewards import remote

    problem = remote.url_problem(args.rm_url) if args.rm_url else None
    if problem:
        raise UsageError(
            f"--rm-url {remote.shown(args.rm_url)} {problem}; "
            "give the http(s):// address of the reward server."
        )
    if not 0 <= args.rm_max_retries <= remote.MAX_RETRIES:
        raise UsageError(f"--rm-max-retries must be between 0 and {remote.MAX_RETRIES} (default 3).")
    if not 0 <= args.rm_retry_backoff <= remote.MAX_BACKOFF_S:
        raise UsageError(
            f"--rm-retry-backoff must be between 0 and {remote.MAX_BACKOFF_S:g} seconds (default 0.5)."
        )
    if not args.rm_request_timeout > 0:
        raise UsageError("--rm-request-timeout must be a positive number of seconds (default 30).")


def _check_overlong(args: argparse.Namespace) -> bool:
    buffer_len, max_len = args.overlong_buffer_len, args.rollout_max_response_len
    if buffer_len is None:
        return False
    if buffer_len <= 0 or buffer_len > max_len:
        raise UsageError(
            f"--overlong-buffer-len {buffer_len} must be between 1 and --rollout-max-response-len "
            f"({max_len}); DAPO uses a quarter of the budget, e.g. {max(1, max_len // 4)}."
        )
    if args.overlong_penalty_factor < 0:
        raise UsageError("--overlong-penalty-factor must be >= 0 (DAPO uses 1.0).")
    return True


class OverlongRun:
    """DAPO's overlong penalty for one run (``--overlong-buffer-len``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @hookimpl
    def post_reward(self, samples: list[Sample]) -> None:
        from miles_rewards.overlong import apply_overlong_penalty

        apply_overlong_penalty(self.args, samples)

    @hookimpl
    def rollout_metrics(self, samples: list[Sample]) -> dict:
        from miles_rewards.overlong import overlong_metrics

        return overlong_metrics(samples)
