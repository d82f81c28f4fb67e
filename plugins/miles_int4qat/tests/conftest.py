"""Import paths for the miles-int4qat tests: the plugin and the core, straight from the source tree.

Shared fixtures live in ``int4_helpers.py`` (a unique name: conftest modules of several plugins clash).
"""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
for _path in (_PLUGIN_ROOT, _PLUGIN_ROOT.parents[1], Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from miles_core.testing import one_torch_thread  # noqa: E402, F401  (autouse: one torch thread)
