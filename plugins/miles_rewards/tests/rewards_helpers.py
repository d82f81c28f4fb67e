"""Helpers of the miles-rewards tests: the real data folder and running async rewards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from miles_core.types import Sample

DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"


def run(coro: Any) -> Any:
    """Run one coroutine to completion (rewards are async)."""
    return asyncio.run(coro)


def score(reward_fn: Any, response: str, label: Any, args: Any = None, **metadata: Any) -> Any:
    """What ``reward_fn`` gives one response/label pair."""
    sample = Sample(prompt="q", response=response, label=label, metadata=metadata)
    return run(reward_fn(args or SimpleNamespace(), sample))


def load_jsonl(relative: str) -> list[dict[str, Any]]:
    """Rows of ``<repo>/../shared/data/<relative>``; skips the test when the data folder is absent."""
    path = DATA_DIR / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent: these tests read the shared data sets laid beside the checkout")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]
