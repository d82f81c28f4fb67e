"""Scoring samples: resolve the reward function, run it with a concurrency bound and a time limit.

The reward comes from ``--custom-rm-path`` or ``--rm-type NAME`` (an entry point of ``miles.rewards``;
``boxed_NAME`` first reduces the response to its last ``\\boxed{}``), overridable per sample by
``metadata["rm_type"]``. A reward that raises or times out marks its sample FAILED; the run goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import inspect
from collections.abc import Callable
from typing import Any

from miles_core import drivers
from miles_core.custom import load_function
from miles_core.logging import get_logger
from miles_core.rollout.boxed import last_boxed
from miles_core.types import Sample, Status

log = get_logger(__name__)


def _boxed_wrapper(inner: Callable) -> Callable:
    async def reward(args, sample):
        boxed = last_boxed(sample.response or "")
        reduced = copy.copy(sample)
        reduced.response = boxed if boxed is not None else ""
        return await _maybe_await(inner(args, reduced))

    return reward


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def resolve_rm(name: str) -> Callable:
    """The reward function for an ``--rm-type`` name (``boxed_`` prefix understood)."""
    if name.startswith("boxed_"):
        return _boxed_wrapper(drivers.get_reward_fn(name[len("boxed_") :]))
    return drivers.get_reward_fn(name)


class RewardRunner:
    """Scores samples for one run; keeps counts of failures for the metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.group = bool(args.group_rm)
        if args.custom_rm_path:
            self.fn = load_function(
                args.custom_rm_path, "reward", group=drivers.REWARDS, flag="--custom-rm-path"
            )
        else:
            self.fn = resolve_rm(args.rm_type)
        self._by_name: dict[str, Callable] = {}
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self.failures = 0
        self.errors: list[str] = []

    def _fn_for(self, sample: Sample) -> Callable:
        name = sample.metadata.get("rm_type") if isinstance(sample.metadata, dict) else None
        if not name or self.args.custom_rm_path:
            return self.fn
        if name not in self._by_name:
            self._by_name[name] = resolve_rm(name)
        return self._by_name[name]

    async def _call(self, fn: Callable, *call_args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # each rollout runs its own event loop
            self._sem, self._sem_loop = asyncio.Semaphore(max(1, self.args.rm_concurrency)), loop
        async with self._sem:
            coro = _maybe_await(fn(self.args, *call_args))
            if self.args.rm_timeout:
                return await asyncio.wait_for(coro, timeout=self.args.rm_timeout)
            return await coro

    def _fail(self, samples: list[Sample], err: BaseException) -> None:
        what = "timed out" if isinstance(err, asyncio.TimeoutError) else f"raised {type(err).__name__}: {err}"
        msg = f"reward function {what}"
        for s in samples:
            s.status = Status.FAILED
            s.reward = 0.0
            s.metadata["reward_error"] = msg
        self.failures += len(samples)
        if len(self.errors) < 5:
            self.errors.append(msg)
            log.warning("sample %s: %s; marked FAILED, the run continues.", samples[0].index, msg)

    async def score(self, sample: Sample) -> None:
        """Set ``sample.reward`` (or mark the sample FAILED)."""
        if sample.status == Status.FAILED:
            sample.reward = 0.0
            return
        try:
            sample.reward = await self._call(self._fn_for(sample), sample)
        except Exception as e:  # a user's reward must not end the run
            self._fail([sample], e)

    async def score_group(self, samples: list[Sample]) -> None:
        """``--group-rm``: one call of a ``--custom-rm-path`` function scores the whole group and must
        return one reward per sample; an ``--rm-type`` reward scores a sample at a time, so the group's
        samples are scored concurrently (slime's batched reward does the same)."""
        if not self.args.custom_rm_path:
            await asyncio.gather(*(self.score(s) for s in samples))
            return
        try:
            rewards = await self._call(self.fn, samples)
            if len(rewards) != len(samples):
                raise ValueError(f"returned {len(rewards)} rewards for a group of {len(samples)}")
            for s, r in zip(samples, rewards):
                s.reward = r
        except Exception as e:
            self._fail(samples, e)
