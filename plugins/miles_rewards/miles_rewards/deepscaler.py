"""The ``deepscaler`` reward: a reasoning response must close its thinking before the boxed answer.

The answer is the last ``\\boxed{}`` after ``</think>`` (or ``###Response``), graded with the math grader;
a response without either marker or without a box after it scores 0.0 (format error), as in DeepScaleR.
"""

from __future__ import annotations

import asyncio
from typing import Any

from miles_rewards import math_grader
from miles_rewards.math_grader import DEFAULT_TIMEOUT_S

_MARKERS = ("</think>", "###Response")


def answer_part(response: str) -> str | None:
    """The text after the first end-of-thinking marker, or None when the response has none."""
    for marker in _MARKERS:
        if marker in (response or ""):
            return response.split(marker, 1)[1]
    return None


def grade_response(response: str, label: object, timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the boxed answer after the thinking marker equals the label, else 0.0."""
    part = answer_part(response)
    return 0.0 if part is None else math_grader.grade_response(part, label, timeout)


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type deepscaler``: math grading of the answer after ``</think>`` / ``###Response``."""
    timeout = float(getattr(args, "math_equivalence_timeout", DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S)
    return await asyncio.to_thread(grade_response, sample.response, sample.label, timeout)
