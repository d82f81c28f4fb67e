"""Import paths for the miles-rewards tests: the plugin and the core, straight from the source tree.

Until the plugin is installed (``pip install -e plugins/miles_rewards``) this makes ``miles_rewards`` and
``miles_core`` importable; helpers live in ``rewards_helpers.py`` (a unique name: conftest modules clash).
"""

from __future__ import annotations

import sys
from pathlib import Path

_PLUGIN_ROOT = Path(__file__).resolve().parents[1]
for _path in (_PLUGIN_ROOT, _PLUGIN_ROOT.parents[1]):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
