"""Test helpers shared by the plugins' test suites (imported from their ``conftest.py``; needs pytest).

from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one thread is as fast, and on a busy CPU several threads' OpenMP spin-waits make small
    matmuls up to ~100x slower. Restored after each test so other test directories are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
