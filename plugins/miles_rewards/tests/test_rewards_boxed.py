"""Tests of miles_core.rollout.boxed.last_boxed, the extractor the core and the graders share."""

from __future__ import annotations

import pytest

from miles_core.rollout.boxed import last_boxed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{5}$.", "5"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{42}", "42"),
        (r"answer $\boxed 7$ done", "7"),
        (r"\boxed {x+1}", "x+1"),
        (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),
        ("no box here", None),
        ("", None),
        (r"\boxedx{3}", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected
