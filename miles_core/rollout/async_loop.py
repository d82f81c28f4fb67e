"""How rollouts reach the trainer: generated when asked for (sync), or ahead of it on a thread (``--async``).

Weight version v is the number of rollouts trained so far, so the trainer trains rollout k at version k.
`AsyncRollouts` (slime's ``train_async.py``) runs the rollout manager on a thread with an event loop of
its own and starts rollout k as soon as the engine serves version k - N (N = ``--max-weight-staleness``):
with N = 1 rollout k+1 is generated while the trainer trains on k; with N = 0 rollout k starts only once
the weights of version k are loaded, exactly as in sync mode. Every token of rollout k is then sampled at
version k - N or later, so no sample is staler than N. A weight update arriving mid-rollout pauses the
requests in flight (``--update-weights-pause-mode``): in place, or abort them to be sent again, from
scratch or, with ``--partial-rollout``, from their partial responses (`miles_core.rollout.generate`).

Evaluations run on the rollout thread too (the engine serves one event loop at a time), between two
rollouts, while the loop waits for them: at the weights the loop has just loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import torch

from miles_core.data.sft import sft_samples
from miles_core.logging import get_logger
from miles_core.rollout.manager import RolloutManager
from miles_core.types import Sample

log = get_logger(__name__)

STOP_WAIT_S = 60.0  # how long closing waits for the rollout thread to end its rollout in flight


class SyncRollouts:
    """Rollout k is generated when the loop asks for it, with the weights of version k."""

    def __init__(self, manager: RolloutManager, engine: Any) -> None:
        self.manager, self.engine = manager, engine

    def take(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        """Rollout ``rollout_id``'s samples and metrics (``rollout/wait_s``: how long the trainer waited)."""
        start = time.perf_counter()
        samples, metrics = self.manager.generate(rollout_id)
        metrics["rollout/wait_s"] = time.perf_counter() - start
        return samples, metrics

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Serve the trainer's weights as ``version`` from now on."""
        self.engine.update_weights(named_tensors, version=version)

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        return self.manager.evaluate(rollout_id)

    def data_state(self, rollout_id: int) -> dict:
        """The data position to checkpoint when rollout ``rollout_id`` is the next to train."""
        return self.manager.data_state(rollout_id)

    def close(self) -> None:
        """Nothing runs in the background."""

    def __enter__(self) -> SyncRollouts:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SftRollouts(SyncRollouts):
    """``--loss-type sft_loss``: rollout k is the next ``--rollout-batch-size`` prompt/response rows as
    samples (`miles_core.data.sft`); nothing is generated or rewarded. The engine still gets the weights,
    for evaluation."""

    def take(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        start = time.perf_counter()
        prompts = self.manager._next_prompts(rollout_id)
        samples = sft_samples(prompts, self.manager.tokenizer, self.manager.args.system_prompt)
        n = max(len(samples), 1)
        return samples, {
            "rollout/reward_mean": 0.0,
            "rollout/response_len_mean": sum(s.response_length for s in samples) / n,
            "rollout/num_samples": float(len(samples)),
            "rollout/wait_s": time.perf_counter() - start,
        }


class AsyncRollouts(SyncRollouts):
    """Rollouts ``start`` .. ``end - 1``, generated ahead on a thread within the staleness bound."""

    def __init__(
        self, manager: RolloutManager, engine: Any, args: argparse.Namespace, start: int, end: int
    ) -> None:
        super().__init__(manager, engine)
        self.max_staleness = args.max_weight_staleness
        self.pause_mode = args.update_weights_pause_mode
        self._cond = threading.Condition()
        self._version = start  # the weight version the engine serves (rollouts trained so far)
        self._next, self._end = start, end  # the next rollout to generate; one past the last
        self._results: dict[int, Any] = {}  # rollout id -> (samples, metrics), or the error it raised
        self._jobs: list[tuple[Callable[[], Coroutine], concurrent.futures.Future]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="miles-rollout", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the rollout thread

    def _has_work(self) -> bool:
        due = self._next < self._end and self._version >= self._next - self.max_staleness
        return self._closing or bool(self._jobs) or due

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(self._has_work)
                    if self._closing:
                        return
                    job = self._jobs.pop(0) if self._jobs else None
                    if job is None:
                        rollout_id, self._next = self._next, self._next + 1
                if job is not None:
                    make, done = job
                    try:
                        done.set_result(loop.run_until_complete(make()))
                    except BaseException as e:  # the loop's thread gets it from the future
                        done.set_exception(e)
                    continue
                try:
                    result: Any = loop.run_until_complete(self.manager.agenerate(rollout_id))
                except BaseException as e:  # handed to the loop, which raises it when it takes the rollout
                    result = e
                with self._cond:
                    self._results[rollout_id] = result
                    if isinstance(result, BaseException):
                        self._end = rollout_id + 1  # nothing after a failed rollout
                    self._cond.notify_all()
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    # ---------------------------------------------------------------- the loop's side

    def take(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        """Wait for rollout ``rollout_id``; ``rollout/wait_s`` is how long the trainer waited for it."""
        start = time.perf_counter()
        with self._cond:
            while not self._cond.wait_for(lambda: rollout_id in self._results, timeout=1.0):
                if not self._thread.is_alive():
                    raise RuntimeError(f"the rollout thread ended before rollout {rollout_id}.")
            result = self._results.pop(rollout_id)
        if isinstance(result, BaseException):
            raise result
        samples, metrics = result
        metrics["rollout/wait_s"] = time.perf_counter() - start
        return samples, metrics

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Pause the requests in flight (in place, or aborted to be sent again), load the weights as
        ``version``, continue, and let the rollouts that version unblocks start."""
        self.engine.pause_generation(self.pause_mode)
        try:
            self.engine.update_weights(named_tensors, version=version)
        finally:
            self.engine.continue_generation()
        with self._cond:
            self._version = version
            self._cond.notify_all()

    def _run_on_thread(self, make: Callable[[], Coroutine]) -> Any:
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._jobs.append((make, done))
            self._cond.notify_all()
        while True:
            try:
                return done.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if not self._thread.is_alive():
                    raise RuntimeError("the rollout thread ended before the evaluation ran.") from None

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        """Evaluate on the rollout thread, before it starts another rollout (the weights stay as they are
        until this returns: the loop is waiting)."""
        return self._run_on_thread(lambda: self.manager.aevaluate(rollout_id))

    def close(self) -> None:
        """Stop the rollout thread; a rollout in flight is aborted (its requests are not sent again)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.manager.stopping.set()
        deadline = time.monotonic() + STOP_WAIT_S
        self._thread.join(0.05)
        while self._thread.is_alive() and time.monotonic() < deadline:
            self.engine.abort()
            self._thread.join(0.5)
        if self._thread.is_alive():
            log.warning("the rollout thread did not stop within %.0f s; leaving it behind.", STOP_WAIT_S)


def open_rollouts(args: argparse.Namespace, manager: RolloutManager, engine: Any, start: int) -> SyncRollouts:
    """The rollouts of a run from rollout ``start`` on: `AsyncRollouts` with ``--async``, else sync."""
    if args.loss_type == "sft_loss":
        return SftRollouts(manager, engine)
    if args.async_rollout:
        return AsyncRollouts(manager, engine, args, start, args.num_rollout)
    return SyncRollouts(manager, engine)
