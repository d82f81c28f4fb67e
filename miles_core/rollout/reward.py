"""Scoring samples: resolve the reward function, run it with a concurrency bound and a time limit.

The reward comes from ``--custom-rm-path`` or ``--rm-type NAME`` (an entry point of ``miles.rewards``;
``boxed_NAME`` first reduces the response to its last ``\\boxed{}``), overridable per sample by
``metadata["rm_type"]``. Every call, of a plain or an ``async`` function, runs in a worker thread with an
event loop of its own, so a reward that blocks (``time.sleep``, a slow library) is still cut off by
``--rm-timeout``. A reward that raises, times out or returns a bad value marks its sample FAILED; the run
goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import inspect
import threading
from collections.abc import Callable
from typing import Any

from miles_core import drivers
from miles_core.custom import load_function
from miles_core.rollout.boxed import last_boxed
from miles_core.rollout.checks import (
    FailureLog,
    SampleError,
    checked_group_rewards,
    checked_reward,
    raised,
)
from miles_core.types import EXCLUDED, Sample


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


class _Worker:
    """A daemon thread running an event loop of its own, on which reward calls run one at a time.

    A thread cannot be interrupted, so a call that outlasts ``--rm-timeout`` is abandoned: its worker is
    told to stop once the call returns and is never reused. Being a daemon, a stuck worker does not keep
    the process alive at exit (nothing joins it).
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="miles-reward", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:  # abandoned: let a call that was cancelled (not blocked) unwind, then close
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    def abandon(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


async def _invoke(fn: Callable, call_args: tuple, done: asyncio.Future) -> None:
    """Run ``fn(*call_args)`` on a worker's loop and settle ``done`` (a future of the caller's loop) with
    ``(True, value)``, or ``(False, exception)`` when it raised (so that a TimeoutError the function
    raises is not taken for ``--rm-timeout``)."""
    try:
        result = True, await _maybe_await(fn(*call_args))
    except Exception as err:
        result = False, err
    with contextlib.suppress(RuntimeError):  # the caller's loop has closed: nobody waits any more
        done.get_loop().call_soon_threadsafe(_settle, done, result)


def _settle(done: asyncio.Future, result: tuple[bool, Any]) -> None:
    if not done.done():  # not given up on (timed out, cancelled)
        done.set_result(result)


class RewardRunner:
    """Scores samples for one run; counts failures (shared with the rollout manager's `FailureLog`)."""

    def __init__(self, args: argparse.Namespace, failures: FailureLog | None = None) -> None:
        self.args = args
        self.group = bool(args.group_rm)
        if args.custom_rm_path:
            self.fn = load_function(
                args.custom_rm_path, "reward", group=drivers.REWARDS, flag="--custom-rm-path"
            )
            self.source = f"--custom-rm-path {args.custom_rm_path}"
        elif args.rm_type:
            self.fn = resolve_rm(args.rm_type)
            self.source = f"--rm-type {args.rm_type}"
        else:  # --loss-type sft_loss without eval: nothing is ever scored
            self.fn, self.source = None, "no reward"
        self.log = failures if failures is not None else FailureLog()
        self._by_name: dict[str, Callable] = {}
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Worker] = []  # workers whose last call returned; reused, at most --rm-concurrency

    def close(self) -> None:
        """Stop the idle worker threads and close their event loops (a run's end; a later call starts
        new ones). Without it each run would leave up to --rm-concurrency loops, each holding an epoll
        descriptor and a socket pair, for the life of the process."""
        idle, self._idle = self._idle, []
        for worker in idle:
            worker.abandon()
        for worker in idle:  # idle: each closes its loop at once (bounded, should one be slow to run)
            worker.thread.join(5)

    @property
    def failures(self) -> int:
        """Samples failed by a reward so far in this run."""
        return self.log.total("reward")

    def _fn_for(self, sample: Sample) -> tuple[Callable, str]:
        name = sample.metadata.get("rm_type") if isinstance(sample.metadata, dict) else None
        if not name or self.args.custom_rm_path:
            return self.fn, self.source
        if name not in self._by_name:
            self._by_name[name] = resolve_rm(name)
        return self._by_name[name], f"--rm-type {name} (the row's metadata rm_type)"

    async def _call(self, fn: Callable, *call_args: Any) -> Any:
        """``fn(args, *call_args)`` on a worker thread, awaited here for at most ``--rm-timeout``."""
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # each rollout runs its own event loop
            self._sem, self._sem_loop = asyncio.Semaphore(max(1, self.args.rm_concurrency)), loop
        async with self._sem:
            worker = self._idle.pop() if self._idle else _Worker()
            done = loop.create_future()
            worker.loop.call_soon_threadsafe(
                worker.loop.create_task, _invoke(fn, (self.args, *call_args), done)
            )
            try:
                ok, value = await asyncio.wait_for(done, self.args.rm_timeout or None)
            except BaseException as err:  # timed out or cancelled: the call may still be running
                worker.abandon()
                if isinstance(err, asyncio.TimeoutError):
                    raise SampleError(
                        f"did not return within --rm-timeout {self.args.rm_timeout:g} s (timed out)",
                        fix="make it faster, or raise --rm-timeout",
                    ) from None
                raise
            self._idle.append(worker)
        if not ok:
            raise raised(value, "fix it (miles rm-check scores a JSONL of responses with it)")
        return value

    async def score(self, sample: Sample, key: str | None = None) -> None:
        """Set ``sample.reward`` (or mark the sample FAILED); ``key`` is the dict entry that must be a
        number (default ``--reward-key``)."""
        if sample.status in EXCLUDED:  # failed or aborted: nothing to score
            sample.reward = 0.0
            return
        fn, source = self._fn_for(sample)
        try:
            sample.reward = checked_reward(await self._call(fn, sample), key or self.args.reward_key, source)
        except SampleError as err:  # a user's reward must not end the run
            self.log.record([sample], "reward", source, err)

    async def score_group(self, samples: list[Sample], key: str | None = None) -> None:
        """``--group-rm``: one call of a ``--custom-rm-path`` function scores the whole group and must
        return one reward per sample; an ``--rm-type`` reward scores a sample at a time, so the group's
        samples are scored concurrently (slime's batched reward does the same)."""
        if not self.args.custom_rm_path:
            await asyncio.gather(*(self.score(s, key) for s in samples))
            return
        try:
            rewards = checked_group_rewards(await self._call(self.fn, samples), len(samples))
        except SampleError as err:
            self.log.record(samples, "reward", self.source, err)
            return
        for s, r in zip(samples, rewards):
            if s.status in EXCLUDED:  # its generate function failed or timed out: no reward to check
                s.reward = 0.0
                continue
            try:
                s.reward = checked_reward(r, key or self.args.reward_key, self.source)
            except SampleError as err:
                self.log.record([s], "reward", self.source, err)
