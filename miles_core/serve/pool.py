"""`WorkerPool`: least-in-flight balancing, health checks and retries over N engine servers, in-process.

The HTTP rollout client sends its requests through a pool, and `miles router` serves one over HTTP. A
request goes to the healthy worker with the fewest requests in flight (ties: round-robin, so sequential
requests spread too). A connection error or a dropped connection marks the worker unhealthy; a 5xx
counts as a failed check; either way the request is retried on another worker. A 4xx is the caller's
mistake and is raised as `WorkerError` at once. A background task GETs ``/health`` on every worker each
``health_check_interval`` seconds: ``failure_threshold`` failures in a row mark a worker unhealthy, one
success brings it back.

aiohttp sessions belong to one event loop, and the rollout manager runs one ``asyncio.run`` per rollout,
so the pool keeps no loop-bound state across loops: the session and the health task are made lazily on
the first call in a loop, and the health task closes the session when it is cancelled (``close()``, or
``asyncio.run`` cancelling leftover tasks as it returns). Worker state (health, counts) outlives loops.
A pool is used from one loop (one thread) at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)
_JSON = {"Content-Type": "application/json"}


class WorkerError(Exception):
    """A request the pool could not get answered: a worker's 4xx (``status`` and its one-sentence
    ``message``, not retried), 503 when no worker is healthy, 502 when every attempt failed."""

    def __init__(self, status: int, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.url = status, message, url


class _Failed(Exception):
    """A worker failed a request (connection error or 5xx): retry elsewhere."""


@dataclass
class Worker:
    url: str
    healthy: bool = True
    in_flight: int = 0
    served: int = 0  # requests answered (any 2xx or 4xx)
    failures: int = 0  # requests that failed on it (connection errors, 5xx)
    failed_checks: int = 0  # consecutive failed health checks (and 5xx answers)


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    wake: asyncio.Event  # set when a worker becomes healthy or is added
    task: asyncio.Task | None = None


def normalize_url(url: Any) -> str:
    """``http://host:port`` (no trailing slash); raises `UsageError` for anything else."""
    if not isinstance(url, str) or not url:
        raise UsageError(f"worker url {url!r} is not a string; give one like http://127.0.0.1:30001.")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
        raise UsageError(f"worker url {url!r} is not http://host:port; give one like http://127.0.0.1:30001.")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise UsageError(
            f"worker url {url!r} has a bad port; give one like http://127.0.0.1:30001."
        ) from None
    return f"{parts.scheme}://{parts.netloc}"


def _encode(body: dict[str, Any] | bytes | None) -> bytes | None:
    return body if isinstance(body, bytes) or body is None else json.dumps(body).encode()


def error_message(raw: bytes, status: int) -> str:
    """The one sentence of an error answer: ``{"error": {"message": ...}}`` (miles, SGLang), ``message``,
    ``detail`` or the text itself."""
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        for key in ("message", "detail", "error"):
            if isinstance(obj.get(key), str):
                return obj[key]
    text = raw.decode("utf-8", "replace").strip()
    return text[:300] or f"HTTP {status}"


class WorkerPool:
    """Balances requests over engine servers (``miles serve`` or SGLang) by their in-flight counts.

    :param urls: the workers, ``http://host:port``.
    :param health_check_interval: seconds between ``/health`` rounds (None or 0: no health checks).
    :param health_check_timeout: seconds a ``/health`` answer may take.
    :param failure_threshold: failed checks in a row that mark a worker unhealthy.
    :param max_retries: re-sends of one request after failures (None: the number of workers).
    :param retry_backoff: seconds before the first re-send, doubled for each later one (at most 1 s).
    :param wait_healthy_s: how long a request waits for a healthy worker when there is none.
    :param connect_timeout: seconds to open a connection to a worker.
    :param on_revive: ``async f(url)`` run when an unhealthy worker answers ``/health`` again, before it
        is used (e.g. to load the current weights into a restarted engine); if it raises, the worker
        stays unhealthy until the next check.
    """

    def __init__(
        self,
        urls: list[str] | tuple[str, ...] = (),
        *,
        health_check_interval: float | None = 5.0,
        health_check_timeout: float = 2.0,
        failure_threshold: int = 3,
        max_retries: int | None = None,
        retry_backoff: float = 0.05,
        wait_healthy_s: float = 30.0,
        connect_timeout: float = 5.0,
        on_revive: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise UsageError(f"failure_threshold={failure_threshold} must be at least 1.")
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self.failure_threshold = failure_threshold
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.wait_healthy_s = wait_healthy_s
        self.connect_timeout = connect_timeout
        self.on_revive = on_revive
        self.retries = 0  # re-sends after a failure, over the pool's life (rollout metrics report it)
        self._workers: list[Worker] = []
        self._next = 0  # round-robin position among equally loaded workers
        self._state: _LoopState | None = None
        for url in [urls] if isinstance(urls, str) else urls:
            self.add(url)

    # ---------------------------------------------------------------- membership

    @property
    def urls(self) -> list[str]:
        return [w.url for w in self._workers]

    @property
    def healthy(self) -> list[str]:
        return [w.url for w in self._workers if w.healthy]

    def workers(self) -> list[dict[str, Any]]:
        """Per worker: url, healthy, in_flight, served, failures, failed_checks."""
        return [asdict(w) for w in self._workers]

    def add(self, url: str) -> str:
        """Add a worker (healthy until it fails); returns its normalized url."""
        url = normalize_url(url)
        if url in self.urls:
            raise UsageError(f"worker {url} is already in the pool; remove it first to re-add it.")
        self._workers.append(Worker(url))
        self._wake()
        return url

    def remove(self, url: str) -> str:
        """Remove a worker; its requests in flight finish there. Returns its normalized url."""
        url = normalize_url(url)
        if url not in self.urls:
            raise UsageError(f"worker {url} is not in the pool; GET /list_workers shows the workers.")
        self._workers = [w for w in self._workers if w.url != url]
        return url

    # ---------------------------------------------------------------- requests

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``/generate`` to the least-loaded healthy worker, retrying elsewhere on failure."""
        return await self.request("POST", "/generate", body)

    async def request(
        self, method: str, path: str, body: dict[str, Any] | bytes | None = None
    ) -> dict[str, Any]:
        """One request to one worker (least in flight), retried on another after a connection error,
        a dropped connection or a 5xx. ``body``: a dict sent as JSON, or bytes sent as they are. Raises
        `WorkerError` (4xx, no healthy worker, retries spent)."""
        st = self._loop_state()
        data = _encode(body)
        attempts = 1 + (len(self._workers) if self.max_retries is None else self.max_retries)
        tried: set[str] = set()
        last = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(self.retry_backoff * 2 ** (attempt - 1), 1.0))
            worker = await self._acquire(st, tried)
            if attempt:
                self.retries += 1
                log.info("retrying %s on %s (attempt %d of %d)", path, worker.url, attempt + 1, attempts)
            try:
                return await self._send(st.session, worker, method, path, data)
            except _Failed as e:
                tried.add(worker.url)
                last = str(e)
            finally:
                worker.in_flight -= 1
        raise WorkerError(
            502,
            f"{path} failed on all {attempts} attempts, last: {last.rstrip('.')}; check the engines' logs.",
        )

    async def broadcast(
        self, path: str, body: dict[str, Any] | bytes | None = None, method: str = "POST"
    ) -> list[dict[str, Any]]:
        """Send one request to every healthy worker at once (pause, continue, weight updates, ...).

        Returns one dict per worker, in pool order: its JSON answer with ``url`` and ``status`` (the HTTP
        status) added; a worker that failed gives ``{"url", "status", "success": False, "message"}``
        (status 502 for a connection error). Nothing is retried."""
        st = self._loop_state()
        data = _encode(body)

        async def one(worker: Worker) -> dict[str, Any]:
            worker.in_flight += 1
            try:
                answer = await self._send(st.session, worker, method, path, data)
                return {**answer, "url": worker.url, "status": 200}
            except WorkerError as e:
                return {"url": worker.url, "status": e.status, "success": False, "message": e.message}
            except _Failed as e:
                return {"url": worker.url, "status": 502, "success": False, "message": str(e)}
            finally:
                worker.in_flight -= 1

        return list(await asyncio.gather(*(one(w) for w in self._workers if w.healthy)))

    async def check_health(self) -> None:
        """One ``/health`` round over every worker (the background task runs one per interval)."""
        st = self._loop_state()
        await asyncio.gather(*(self._check(st.session, w) for w in list(self._workers)))

    async def close(self) -> None:
        """Stop the health checks and close this loop's session (the pool can be used again later)."""
        st, self._state = self._state, None
        if st is None or st.loop is not asyncio.get_running_loop():
            return
        if st.task is not None:
            st.task.cancel()
            await asyncio.gather(st.task, return_exceptions=True)
        await st.session.close()

    async def __aenter__(self) -> WorkerPool:
        self._loop_state()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ---------------------------------------------------------------- internals

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        st = self._state
        if st is not None and st.loop is loop and not st.session.closed:
            return st
        if st is not None and st.loop is not loop and st.loop.is_running():
            raise RuntimeError("this WorkerPool is in use by another running event loop; use one per loop.")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        st = self._state = _LoopState(loop, session, asyncio.Event())
        st.task = loop.create_task(self._keeper(st))
        return st

    async def _keeper(self, st: _LoopState) -> None:
        """Runs the health checks for as long as the loop lives; closes the loop's session when cancelled."""
        try:
            while self.health_check_interval:
                try:
                    await asyncio.gather(*(self._check(st.session, w) for w in list(self._workers)))
                except Exception:  # a bug here must not stop the checks
                    log.exception("health check round failed")
                await asyncio.sleep(self.health_check_interval)
            await asyncio.Event().wait()
        finally:
            await st.session.close()

    def _wake(self) -> None:
        st = self._state
        if st is None or st.loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop() is st.loop
        except RuntimeError:
            here = False
        if here:
            st.wake.set()
        else:
            st.loop.call_soon_threadsafe(st.wake.set)

    def _pick(self, tried: set[str]) -> Worker | None:
        """The least-loaded healthy worker, preferring ones this request has not failed on; ties go
        round-robin from the worker after the last one picked."""
        healthy = [(i, w) for i, w in enumerate(self._workers) if w.healthy]
        cands = [(i, w) for i, w in healthy if w.url not in tried] or healthy
        if not cands:
            return None
        least = min(w.in_flight for _, w in cands)
        tied = [(i, w) for i, w in cands if w.in_flight == least]
        i, w = next(((i, w) for i, w in tied if i >= self._next), tied[0])
        self._next = i + 1
        return w

    async def _acquire(self, st: _LoopState, tried: set[str]) -> Worker:
        """Pick a worker and count the request in flight on it; waits (bounded) for a healthy one."""
        deadline = st.loop.time() + self.wait_healthy_s
        while (worker := self._pick(tried)) is None:
            left = deadline - st.loop.time()
            if left <= 0:
                raise WorkerError(
                    503,
                    f"no healthy engine worker among {len(self._workers)} ({', '.join(self.urls) or 'none'}) "
                    f"after {self.wait_healthy_s:g} s; start an engine or add one with /add_worker.",
                )
            st.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(st.wake.wait(), left)
        worker.in_flight += 1
        return worker

    async def _send(
        self, session: aiohttp.ClientSession, w: Worker, method: str, path: str, data: bytes | None
    ) -> dict[str, Any]:
        try:
            async with session.request(method, w.url + path, data=data, headers=_JSON) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            w.failures += 1
            self._set_health(w, False, f"{type(e).__name__}: {e}")
            raise _Failed(f"{w.url}: {type(e).__name__}: {e}") from None
        if status >= 500:
            w.failures += 1
            self._failed_check(w, f"HTTP {status} on {path}")
            raise _Failed(f"{w.url}: HTTP {status}: {error_message(raw, status)}")
        w.served += 1
        if status >= 400:
            raise WorkerError(status, error_message(raw, status), w.url)
        if not raw.strip():
            return {}
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"text": raw.decode("utf-8", "replace")}
        return answer if isinstance(answer, dict) else {"result": answer}

    async def _check(self, session: aiohttp.ClientSession, w: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self.health_check_timeout)
        try:
            async with session.get(w.url + "/health", timeout=timeout) as resp:
                ok, why = resp.status == 200, f"/health answered HTTP {resp.status}"
        except asyncio.TimeoutError:
            if w.in_flight:  # busy, not dead: a long prefill holds its loop; a dead one refuses or drops
                return
            ok, why = False, f"/health: no answer in {self.health_check_timeout} s"
        except aiohttp.ClientError as e:
            ok, why = False, f"/health: {type(e).__name__}: {e}"
        if not ok:
            self._failed_check(w, why)
            return
        w.failed_checks = 0
        if not w.healthy and self.on_revive is not None:
            try:
                await self.on_revive(w.url)
            except Exception as e:  # stays out of rotation; the next check tries again
                log.warning(
                    "worker %s answers /health but on_revive failed: %s: %s", w.url, type(e).__name__, e
                )
                return
        self._set_health(w, True, "/health answered")

    def _failed_check(self, w: Worker, why: str) -> None:
        w.failed_checks += 1
        if w.failed_checks >= self.failure_threshold:
            self._set_health(w, False, f"{why} ({w.failed_checks} failures in a row)")

    def _set_health(self, w: Worker, healthy: bool, why: str) -> None:
        if w.healthy == healthy:
            return
        log.warning("worker %s is %s: %s", w.url, "healthy again" if healthy else "unhealthy", why)
        w.healthy = healthy
        if healthy:
            self._wake()
