"""Tests of the example package's reward, runnable without a model: ``pytest tests`` after installing it.

A reward is a plain async function, so it is tested by calling it on a hand-made ``Sample``.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from miles_example_plugin.rewards import exact_number, last_number

from miles_core import Sample, UsageError


def score(response: str, label: str, tolerance: float = 0.0) -> float:
    sample = Sample(response=response, label=label)
    return asyncio.run(exact_number(SimpleNamespace(exact_number_tolerance=tolerance), sample))


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("The answer is 1,234.", "1234", 1.0),
        ("3 apples and 4 pears: 7", "7", 1.0),
        ("x = -2.50", "-2.5", 1.0),
        ("it is 8, not 7", "8", 0.0),  # the last number counts
        ("no idea", "3", 0.0),
        ("12.4", "12", 0.0),
    ],
)
def test_exact_number(response, label, expected):
    assert score(response, label) == expected


def test_tolerance_and_bad_label():
    assert score("12.4", "12", tolerance=0.5) == 1.0
    with pytest.raises(UsageError, match="numeric label"):
        score("1", "one")


def test_last_number():
    assert last_number("1, 2, 3") == 3.0 and last_number(".5 or 10,000") == 10000.0
    assert last_number("none") is None
