"""Engine servers from blocking code: an asyncio loop on a daemon thread, with the session that sends
control requests, and the worker list of a running router.

aiohttp sessions belong to one event loop, while the rollout manager runs one ``asyncio.run`` per rollout
and the trainer calls from its own thread: the HTTP client keeps its sessions (and its `WorkerPool`) on
this loop, and every caller submits coroutines to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp

from miles_core.errors import UsageError
from miles_core.serve.pool import WorkerError, error_message, normalize_url

T = TypeVar("T")
_JSON = {"Content-Type": "application/json"}


class LoopThread:
    """An asyncio loop running forever on a daemon thread, and a session for control requests."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()
        self._session: aiohttp.ClientSession | None = None

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop (from any other thread). It runs in a context of its own: tasks it
        leaves behind (the pool's health checks) must not keep the caller's context variables (a
        rollout's) alive."""
        return contextvars.Context().run(asyncio.run_coroutine_threadsafe, coro, self.loop)

    def run(self, coro: Awaitable[T]) -> T:
        """Run ``coro`` on the loop and wait for its result (never from the loop's own thread)."""
        return self.wait(self.submit(coro))

    def wait(self, fut: concurrent.futures.Future[T]) -> T:
        """The result of a submitted coroutine; raises instead of waiting forever if the loop stops."""
        while True:
            try:
                return fut.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if not self.loop.is_running():
                    fut.cancel()
                    raise RuntimeError("the HTTP client is closed; its event loop has stopped.") from None

    async def post(self, url: str, path: str, body: dict | bytes) -> dict:
        """One control request to one engine (on the loop); raises `WorkerError` with its sentence.
        ``body``: a JSON object, or its encoding already made (bytes)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            async with self._session.post(url + path, data=data, headers=_JSON) as resp:
                status, raw = resp.status, await resp.read()
        except aiohttp.ClientError as e:
            raise WorkerError(502, f"{path} on {url} failed ({type(e).__name__}: {e}).", url) from None
        if status >= 400:
            raise WorkerError(status, f"{path} on {url}: {error_message(raw, status)}", url)
        return json.loads(raw) if raw.strip() else {}

    def post_all(self, urls: list[str], path: str, body: dict | bytes) -> list[Any]:
        """``path`` on every engine at once; each engine's answer or the exception it raised."""

        async def gather() -> list[Any]:
            return list(
                await asyncio.gather(*(self.post(u, path, body) for u in urls), return_exceptions=True)
            )

        return self.run(gather())

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def get_json(url: str, timeout: float = 10.0) -> dict:
    """``GET url`` from blocking code: the JSON object it answers (raises OSError or ValueError)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        answer = json.loads(r.read() or b"{}")
    return answer if isinstance(answer, dict) else {}


def post_json(url: str, body: dict, timeout: float = 600.0) -> dict:
    """``POST url`` with a JSON body from blocking code; raises `WorkerError` with the server's sentence."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=_JSON)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise WorkerError(e.code, f"{url}: {error_message(e.read(), e.code)}", url) from None
    except OSError as e:
        raise WorkerError(502, f"{url} failed ({type(e).__name__}: {e}).", url) from None
    return json.loads(raw) if raw.strip() else {}


def router_workers(router: str) -> list[str]:
    """The workers of a running router (``GET /list_workers``, as the miles and SGLang routers answer)."""
    try:
        urls = get_json(router + "/list_workers").get("urls") or []
    except (OSError, ValueError) as e:
        raise UsageError(
            f"the router at {router} did not list its workers ({e}); check --sglang-router-ip and "
            "--sglang-router-port."
        ) from None
    return [normalize_url(u) for u in urls]
