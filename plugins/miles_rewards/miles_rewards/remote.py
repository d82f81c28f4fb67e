"""The ``remote_rm`` reward: ask an HTTP reward server to score each sample.

POSTs ``{"prompt", "response", "label"}`` as JSON to ``--rm-url`` with the standard library (in a worker
thread, so the event loop keeps going), retrying connection errors, timeouts and HTTP 5xx with
exponential backoff. The server answers a number, ``{"reward": x}``, ``{"score": x}`` or any other dict.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from miles_core import UsageError

_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


def _post(url: str, payload: dict[str, Any], timeout: float) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    # A local reward server must not be sent through an http_proxy set for the outside world.
    handlers = [urllib.request.ProxyHandler({})] if urllib.parse.urlsplit(url).hostname in _LOOPBACK else []
    with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
        return response.read()


def _reward_from(body: bytes, url: str) -> float | dict[str, Any]:
    """The reward in a server answer; a dict without ``reward``/``score`` is returned whole."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise RuntimeError(
            f"Reward server {url} answered something other than JSON: {body[:200]!r}."
        ) from exc
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise RuntimeError(f"Reward server {url} answered {value!r}; it must answer a number or JSON object.")
    if isinstance(value, dict):
        for key in ("reward", "score"):
            if key in value:
                return float(value[key])
        return value
    return float(value)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def reward(args: Any, sample: Any) -> float | dict[str, Any]:
    """``--rm-type remote_rm``: the reward the server at ``--rm-url`` gives this sample."""
    url = getattr(args, "rm_url", None)
    if not url:
        raise UsageError("--rm-type remote_rm needs --rm-url http://host:port/path of the reward server.")
    attempts = 1 + max(0, int(getattr(args, "rm_max_retries", 3)))
    backoff = float(getattr(args, "rm_retry_backoff", 0.5))
    timeout = float(getattr(args, "rm_request_timeout", 30.0))
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            body = await asyncio.to_thread(_post, url, payload, timeout)
            return _reward_from(body, url)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # the request itself is wrong: retrying cannot help
                raise RuntimeError(f"Reward server {url} refused the request with {_describe(exc)}.") from exc
            last = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # incl. timeouts
            last = exc
        if attempt + 1 < attempts:
            await asyncio.sleep(backoff * 2**attempt)
    raise RuntimeError(
        f"Reward server {url} gave no usable answer in {attempts} attempts (last error: {_describe(last)})."
    )
