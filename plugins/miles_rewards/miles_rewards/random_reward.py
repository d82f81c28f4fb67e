"""The ``random`` reward: 0.0 or 1.0 with equal odds, ignoring the sample (a baseline and a smoke test).

It draws from the ``random`` module's global generator: seed that (``random.seed``) for repeatable runs.
"""

from __future__ import annotations

import random
from typing import Any


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type random``: 1.0 with probability 1/2, else 0.0."""
    return 1.0 if random.random() < 0.5 else 0.0
