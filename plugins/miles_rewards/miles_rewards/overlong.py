"""DAPO's soft overlong punishment: a reward penalty that grows linearly over the last tokens of the budget.

With ``max_len = --rollout-max-response-len`` and ``expected = max_len - --overlong-buffer-len``, a
response of ``L > expected`` tokens gets ``min(-(L - expected) / buffer * factor, 0)`` added to its reward,
so a response that uses the whole budget loses ``factor``. Applied by the plugin's ``post_reward`` hook.
"""

from __future__ import annotations

import argparse

from miles_core import Sample, Status, UsageError


def overlong_penalty(response_length: int, max_len: int, buffer_len: int, factor: float) -> float:
    """The (non-positive) penalty for a response of ``response_length`` tokens; 0 when it fits."""
    expected = max_len - buffer_len
    if response_length <= expected:
        return 0.0
    return min(-(response_length - expected) / buffer_len * factor, 0.0)


def apply_overlong_penalty(args: argparse.Namespace, samples: list[Sample]) -> None:
    """Add the penalty to each scored sample's reward (the ``--reward-key`` entry of a dict reward).

    The penalty is also kept in ``sample.metadata["overlong_penalty"]`` for the rollout metrics.
    """
    buffer_len = args.overlong_buffer_len
    max_len = args.rollout_max_response_len
    for sample in samples:
        if sample.status == Status.FAILED or sample.reward is None:
            continue
        penalty = overlong_penalty(sample.response_length, max_len, buffer_len, args.overlong_penalty_factor)
        sample.metadata["overlong_penalty"] = penalty
        if penalty == 0.0:
            continue
        if isinstance(sample.reward, dict):
            key = args.reward_key
            if not key or key not in sample.reward:
                raise UsageError(
                    f"--overlong-buffer-len needs --reward-key naming the trained entry of the dict reward "
                    f"{sorted(sample.reward)}, e.g. --reward-key score."
                )
            sample.reward[key] = float(sample.reward[key]) + penalty
        else:
            sample.reward = float(sample.reward) + penalty


def overlong_metrics(samples: list[Sample]) -> dict[str, float]:
    """Mean penalty and fraction of penalised samples, over the samples the penalty looked at."""
    penalties = [s.metadata["overlong_penalty"] for s in samples if "overlong_penalty" in s.metadata]
    if not penalties:
        return {}
    return {
        "overlong_penalty_mean": sum(penalties) / len(penalties),
        "overlong_penalized_frac": sum(p < 0 for p in penalties) / len(penalties),
    }
