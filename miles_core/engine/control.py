"""Control of a running engine: abort, pause/continue, weight updates and memory release between steps.

`EngineControl` is a mixin of `Engine`. The engine's state belongs to its scheduler task, so every call
that changes it runs *between* two scheduler steps: at once when the scheduler is idle or when the caller
is a coroutine on the scheduler's own loop (an HTTP handler of ``miles serve``), otherwise (another
thread, e.g. the trainer's while an async rollout runs) it is queued, run by the scheduler at its next
step, and the caller blocks until it has run; if the scheduler's loop is not running (a thread's loop
between two ``run_until_complete`` calls), the caller runs it itself. Each scheduler step holds the lock.
Before such a call the step in flight (static decode path) is settled, so every token is labelled with
the weight version that computed it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from miles_core.devices import Parking
from miles_core.types import UsageError

T = TypeVar("T")


class EngineControl:
    """Thread-safe control calls (state lives on `Engine`)."""

    def _init_control(self) -> None:
        self._lock = threading.RLock()
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._alive = False  # a scheduler task runs (set and cleared under _lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False
        self._released = False
        self._parking = Parking()  # the weights while the memory is released (CUDA)

    # ---------------------------------------------------------------- running a call between steps

    def _between_steps(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` between two scheduler steps (see the module docstring); returns its result."""
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        with self._lock:
            if on_loop or self._stopped():
                return self._call_now(fn)
            done: concurrent.futures.Future = concurrent.futures.Future()
            self._calls.append((fn, done))
        while True:
            try:
                return done.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                pass
            with self._lock:  # the loop may have stopped before the scheduler took the call
                if (fn, done) in self._calls and self._stopped():
                    self._calls.remove((fn, done))
                    return self._call_now(fn)

    def _stopped(self) -> bool:
        """No scheduler step can run now: none is alive, or its loop is not running (a thread's loop between
        two ``run_until_complete`` calls: the task waits there, between two steps). Under ``_lock``."""
        return not self._alive or self._loop is None or not self._loop.is_running()

    def _call_now(self, fn: Callable[[], T]) -> T:
        with torch.inference_mode():
            self._drain()
            return fn()

    def _run_calls(self) -> None:
        """The scheduler's side: run the queued calls (inside ``inference_mode``, on its loop)."""
        with self._lock:
            calls, self._calls = self._calls, []
        if calls:
            self._drain()
        for fn, done in calls:
            try:
                done.set_result(fn())
            except BaseException as e:  # the caller gets the error; the scheduler goes on
                done.set_exception(e)

    def _fail_calls(self, err: BaseException) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for _, done in calls:
            done.set_exception(err)

    # ---------------------------------------------------------------- public control calls

    @property
    def paused(self) -> bool:
        """Whether generation is paused (``pause_generation``) or the memory released."""
        return self._paused or self._released

    def pause_generation(self, mode: str = "in_place") -> int:
        """Stop decoding. ``in_place``: running requests keep their tokens and cache and go on at
        ``continue_generation`` (under whatever weights are loaded then); ``abort``: every waiting and
        running request returns now with what it has (finish reason ``abort``). Returns how many
        requests were aborted."""
        if mode not in ("in_place", "abort"):
            raise UsageError(f"pause mode {mode!r} is not one of in_place, abort.")

        def pause() -> int:
            self._paused = True
            return self._abort_now(None) if mode == "abort" else 0

        return self._between_steps(pause)

    def continue_generation(self) -> None:
        """Resume decoding after ``pause_generation``."""
        self._paused = False

    def abort(self, rid: str | None = None) -> int:
        """Finish the request ``rid`` (every request when None) now: its caller gets the tokens generated
        so far with finish reason ``abort``. Returns how many requests were aborted (0: none matched)."""
        return self._between_steps(lambda: self._abort_now(rid))

    def score(self, input_ids: list[int], temperature: float = 1.0) -> list[float]:
        """Log-probs of ``input_ids[1:]``, each given the tokens before it, at ``temperature`` (0 or less:
        untempered), from one forward of the served weights; ``miles serve``'s prompt scoring."""
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)[None]
        with torch.inference_mode():
            logits = self.model(ids[:, :-1]).logits[0].float()
        if temperature > 0:
            logits = logits / temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0].tolist()

    def flush_cache(self) -> bool:
        """Free the KV cache (and the CUDA graphs sized to it) if no request runs; True if it did."""

        def flush() -> bool:
            if self._running or self._waiting:
                return False
            self._drop_cache()
            return True

        return self._between_steps(flush)

    def release_memory_occupation(self) -> None:
        """Give the device memory back (training shares the GPU): the KV cache and graphs are freed and,
        on CUDA, the weights are parked in pinned host memory in place (`devices.Parking`). Requests wait
        until ``resume_memory_occupation``. Refused while requests run; pause and abort them first."""

        def release() -> None:
            if self._running:
                raise UsageError(
                    f"{len(self._running)} requests are running; abort them (pause_generation with mode "
                    "abort) before releasing the engine's memory."
                )
            self._drop_cache()
            self._released = True
            if self.device.type == "cuda" and not self._parking.parked:
                self._parking.park([*self.model.parameters(), *self.model.buffers()])
                torch.cuda.empty_cache()

        self._between_steps(release)

    def resume_memory_occupation(self) -> None:
        """Take the memory back after ``release_memory_occupation``: weights return to the device."""

        def resume() -> None:
            if self._parking.parked:
                self._parking.unpark()
            self._released = False

        self._between_steps(resume)

    @property
    def memory_released(self) -> bool:
        return self._released

    def _drop_cache(self) -> None:
        self._cache = None
        self._graphs = None
        self._host_copies = None
        self._free = []

    def _abort_now(self, rid: str | None) -> int:
        """On the scheduler's side, with no step in flight: finish the matching requests."""
        n = 0
        for s in list(self._waiting):
            if rid is None or s.rid == rid:
                self._waiting.remove(s)
                s.finish = "abort"
                if not s.future.done():
                    s.future.set_result(s.result(self.weight_version, {}))
                n += 1
        for s in self._running:
            if (rid is None or s.rid == rid) and s.finish is None:
                s.finish = "abort"
                n += 1
        if n:
            self._retire()
        return n
