"""The ``remote_rm`` reward: ask an HTTP reward server to score each sample.

POSTs ``{"prompt", "response", "label"}`` as JSON to ``--rm-url`` (``http://`` or ``https://`` only) with
the standard library, in a worker thread so the event loop keeps going. Connection errors, timeouts, HTTP
5xx and 429 are retried with exponential backoff (at most `MAX_RETRIES` retries, each wait at most
`MAX_BACKOFF_S`). A redirect is followed only for 307/308 to the same scheme, host and port, with the
method and body kept; any other is refused. An answer larger than `MAX_BODY_BYTES` is refused, and an
error quotes at most `EXCERPT_CHARS` characters of what the server said. The server answers a number,
``{"reward": x}``, ``{"score": x}`` or any other dict.
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

MAX_RETRIES = 10  # --rm-max-retries above this is refused
MAX_BACKOFF_S = 30.0  # no wait between two attempts is longer
MAX_BODY_BYTES = 1 << 20  # a reward is a number or a small dict: 1 MiB is plenty
MAX_REDIRECTS = 3
EXCERPT_CHARS = 120
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class _Refused(Exception):
    """An answer that retrying cannot fix (a refused redirect, an oversized body)."""


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a reward server's address, or None when it can."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"is not an http:// or https:// URL (scheme {parts.scheme or 'missing'!r})"
    if not parts.hostname:
        return "names no host"
    if parts.username or parts.password:  # urllib would take them for part of the host name
        return "carries a user name or password, which remote_rm cannot send"
    return None


def shown(url: str) -> str:
    """``url`` for messages: without user name, password, query or fragment (they may hold secrets)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def excerpt(body: bytes | str) -> str:
    """A short, quoted excerpt of a server's answer for an error message."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return repr(text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "...")


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow 307/308 to the same scheme, host and port, keeping the method and body; refuse the rest.

    (urllib would follow a 301/302/303 of a POST as a GET without the body, to any host.)
    """

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        same_origin = (old.scheme, old.hostname, old.port) == (new.scheme, new.hostname, new.port)
        if code in (307, 308) and same_origin:
            return urllib.request.Request(
                newurl, data=req.data, headers=dict(req.headers), method=req.get_method()
            )
        fp.close()
        raise _Refused(
            f"redirected (HTTP {code}) to {shown(newurl)}; only 307/308 redirects to the same host are "
            "followed, so point --rm-url at the final address"
        )

    http_error_308 = urllib.request.HTTPRedirectHandler.http_error_302  # Python 3.10 lacks it


def _post(url: str, payload: dict[str, Any], timeout: float) -> bytes:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    # A local reward server must not be sent through an http_proxy set for the outside world.
    handlers: list[Any] = [_SameOriginRedirects()]
    if urllib.parse.urlsplit(url).hostname in _LOOPBACK:
        handlers.append(urllib.request.ProxyHandler({}))
    with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _Refused(
                f"answered {int(length)} bytes, more than the {MAX_BODY_BYTES} bytes a reward may take"
            )
        body = response.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise _Refused(f"answered more than the {MAX_BODY_BYTES} bytes a reward may take")
    return body


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reward_from(body: bytes, where: str) -> float | dict[str, Any]:
    """The reward in a server answer; a dict without ``reward``/``score`` is returned whole."""
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise RuntimeError(
            f"Reward server {where} answered something other than JSON: {excerpt(body)}."
        ) from exc
    if isinstance(value, dict):
        for key in ("reward", "score"):
            if key in value:
                if not _number(value[key]):
                    raise RuntimeError(
                        f"Reward server {where} answered {excerpt(body)}; its {key!r} must be a number."
                    )
                return float(value[key])
        return value
    if not _number(value):
        raise RuntimeError(
            f"Reward server {where} answered {excerpt(body)}; it must answer a number or a JSON object."
        )
    return float(value)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        try:
            said = exc.read(EXCERPT_CHARS * 4)
        except (OSError, http.client.HTTPException):
            said = b""
        return f"HTTP {exc.code} {exc.reason}" + (f": {excerpt(said)}" if said.strip() else "")
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    if exc is None:
        return "none"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def reward(args: Any, sample: Any) -> float | dict[str, Any]:
    """``--rm-type remote_rm``: the reward the server at ``--rm-url`` gives this sample."""
    url = getattr(args, "rm_url", None)
    if not url:
        raise UsageError("--rm-type remote_rm needs --rm-url http://host:port/path of the reward server.")
    where = shown(url)
    problem = url_problem(url)
    if problem:
        raise UsageError(f"--rm-url {where} {problem}; give the http(s):// address of the reward server.")
    attempts = 1 + min(MAX_RETRIES, max(0, int(getattr(args, "rm_max_retries", 3))))
    backoff = max(0.0, float(getattr(args, "rm_retry_backoff", 0.5)))
    timeout = float(getattr(args, "rm_request_timeout", 30.0))
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            body = await asyncio.to_thread(_post, url, payload, timeout)
            return _reward_from(body, where)
        except _Refused as exc:
            raise RuntimeError(f"Reward server {where} {exc}.") from None
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:  # the request itself is wrong: retrying cannot help
                what = _describe(exc)
                raise RuntimeError(f"Reward server {where} refused the request with {what}.") from None
            last = exc
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:  # incl. timeouts
            last = exc
        if attempt + 1 < attempts:
            await asyncio.sleep(min(MAX_BACKOFF_S, backoff * 2**attempt))
    raise RuntimeError(
        f"Reward server {where} gave no usable answer in {attempts} attempts (last error: {_describe(last)})."
    )
