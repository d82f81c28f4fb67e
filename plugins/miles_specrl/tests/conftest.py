"""Import paths for the miles-specrl tests: the plugin and the core, straight from the source tree.

Until the plugin is installed (``pip install -e plugins/miles_specrl``) this makes ``miles_specrl`` and
``miles_core`` importable; shared fixtures live in ``specrl_helpers.py`` (a unique name: conftest
modules clash).
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
    """These models are tiny: one thread is as fast, and on a busy CPU several threads' OpenMP waits make
    small bf16 matmuls ~100x slower. Restored after each test so other test directories are unaffected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
