"""Import paths for the miles-specrl tests: the plugin and the core, straight from the source tree.

Until the plugin is installed (``pip install -e plugins/miles_specrl``) this makes ``miles_specrl`` and
``miles_core`` importable; shared fixtures live in ``specrl_helpers.py`` (a unique name: conftest
modules clash).
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
