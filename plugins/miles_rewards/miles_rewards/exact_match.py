"""The ``exact_match`` reward: 1.0 when the response equals the label once both are stripped."""

from __future__ import annotations

from typing import Any


def grade_response(response: str, label: object) -> float:
    """1.0 for ``response.strip() == str(label).strip()``, else 0.0 (a missing label never matches)."""
    return float(label is not None and (response or "").strip() == str(label).strip())


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type exact_match``."""
    return grade_response(sample.response, sample.label)
