"""miles: RL post-training for mixture-of-experts LLMs. The core: loop, hook specs, model, engine, trainer.

Plugins import only the names re-exported here and `miles_core.hookspecs`.
"""

from miles_core.plugins import hookimpl
from miles_core.types import Sample, Status, TrainBatch, UsageError

__version__ = "0.1.0"

__all__ = ["Sample", "Status", "TrainBatch", "UsageError", "hookimpl", "__version__"]
