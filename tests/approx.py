"""Small tensor helpers for the hand-computed loss, advantage and correction tests."""

from __future__ import annotations

import pytest
import torch


def t(*xs: float) -> torch.Tensor:
    """A float32 1-D tensor of the given values."""
    return torch.tensor(xs, dtype=torch.float32)


def close(a: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    """Assert ``a`` is 1-D and equals ``expected`` element by element within ``tol``."""
    assert a.shape == (len(expected),)
    for got, want in zip(a.tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=tol), (a.tolist(), expected)
