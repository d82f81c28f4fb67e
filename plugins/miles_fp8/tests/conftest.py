"""Import paths for the miles-fp8 tests (the plugin and the core from the source tree), one torch thread.

Shared helpers live in ``fp8_helpers.py`` (a unique module name: conftest modules of plugins clash).
"""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
for _path in (_PLUGIN_ROOT, _PLUGIN_ROOT.parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from miles_core.testing import one_torch_thread  # noqa: E402, F401  (autouse: one torch thread)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
