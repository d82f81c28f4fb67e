"""miles: RL post-training for mixture-of-experts LLMs. The core: loop, hook specs, model, engine, trainer.

Plugins import only the names re-exported here, `miles_core.types`, `miles_core.hookspecs` and
`miles_core.api` (everything else a plugin may use).
"""

from miles_core.plugins import hookimpl
from miles_core.types import RolloutOptions, Sample, Status, TrainBatch, UsageError

__version__ = "0.1.0"

__all__ = ["RolloutOptions", "Sample", "Status", "TrainBatch", "UsageError", "hookimpl", "__version__"]
