"""miles: RL post-training for mixture-of-experts LLMs. The core: loop, hook specs, model, engine, trainer.

Plugins import only the names re-exported here, `miles_core.types`, `miles_core.hookspecs` and
`miles_core.api` (everything else a plugin may use). Names other than `UsageError` are imported on first
use, so `miles --help` and a mistyped command answer without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from miles_core.errors import UsageError

if TYPE_CHECKING:
    from miles_core.plugins import hookimpl
    from miles_core.types import RolloutOptions, Sample, Status, TrainBatch

__version__ = "0.1.0"

__all__ = ["RolloutOptions", "Sample", "Status", "TrainBatch", "UsageError", "hookimpl", "__version__"]

_LAZY = {
    "RolloutOptions": "miles_core.types",
    "Sample": "miles_core.types",
    "Status": "miles_core.types",
    "TrainBatch": "miles_core.types",
    "hookimpl": "miles_core.plugins",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'miles_core' has no attribute {name!r}")
