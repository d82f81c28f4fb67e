"""The miles-rewards plugin: its flags and its checks. Reward functions live in their own modules.

Registered under ``miles.plugins`` as ``rewards``; the rewards themselves are entry points of the
``miles.rewards`` group, loaded by name when ``--rm-type`` asks for one, so nothing heavy is imported here.
"""

from __future__ import annotations

import argparse

import pluggy

from miles_core.types import Sample, UsageError

try:  # the core re-exports the marker once its plugin manager lands; both are the same marker
    from miles_core.plugins import hookimpl
except ImportError:  # pragma: no cover - depends on how far the core is
    hookimpl = pluggy.HookimplMarker("miles")

REWARD_NAMES = ("math", "gsm8k", "dapo", "deepscaler", "f1", "gpqa", "remote_rm", "random", "exact_match")


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
def configure(args: argparse.Namespace) -> bool:
    rm_type = getattr(args, "rm_type", None) or ""
    if rm_type == "remote_rm" and not getattr(args, "rm_url", None):
        raise UsageError("--rm-type remote_rm needs --rm-url http://host:port/path of the reward server.")
    if getattr(args, "math_equivalence_timeout", 2.0) <= 0:
        raise UsageError("--math-equivalence-timeout must be a positive number of seconds (default 2.0).")
    overlong = _check_overlong(args)
    name = rm_type[len("boxed_") :] if rm_type.startswith("boxed_") else rm_type
    return name in REWARD_NAMES or overlong


def _check_overlong(args: argparse.Namespace) -> bool:
    buffer_len = getattr(args, "overlong_buffer_len", None)
    if buffer_len is None:
        return False
    max_len = getattr(args, "rollout_max_response_len", None)
    if buffer_len <= 0 or (max_len is not None and buffer_len > max_len):
        raise UsageError(
            f"--overlong-buffer-len {buffer_len} must be between 1 and --rollout-max-response-len "
            f"({max_len}); DAPO uses a quarter of the budget, e.g. {max(1, (max_len or 4) // 4)}."
        )
    if getattr(args, "overlong_penalty_factor", 1.0) < 0:
        raise UsageError("--overlong-penalty-factor must be >= 0 (DAPO uses 1.0).")
    return True


@hookimpl
def post_reward(args: argparse.Namespace, samples: list[Sample]) -> None:
    if getattr(args, "overlong_buffer_len", None):
        from miles_rewards.overlong import apply_overlong_penalty

        apply_overlong_penalty(args, samples)


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    if not getattr(args, "overlong_buffer_len", None):
        return None
    from miles_rewards.overlong import overlong_metrics

    return overlong_metrics(samples)
