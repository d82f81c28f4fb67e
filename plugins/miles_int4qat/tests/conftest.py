"""Import paths for the miles-int4qat tests: the plugin and the core, straight from the source tree.

Shared fixtures live in ``int4_helpers.py`` (a unique name: conftest modules of several plugins clash).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
for _path in (_PLUGIN_ROOT, _PLUGIN_ROOT.parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is as fast, and several spin-waiting OpenMP threads on a busy CPU are not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
