"""Tests of ``remote_rm`` against real HTTP servers on 127.0.0.1 (ok, flaky, silent, and malformed)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from miles_rewards import remote
from rewards_helpers import score

from miles_core.types import UsageError


@contextmanager
def serving(handler: type) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (an unused port) for the duration of the block; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/reward"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextmanager
def reward_server(answer: Any) -> Iterator[tuple[str, list[dict]]]:
    """A server on a free loopback port; ``answer(n, payload)`` gives ``(status, body)`` for request n."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(payload)
            status, body = answer(len(received), payload)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())
            except OSError:  # the client gave up waiting (the timeout test)
                pass

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

    with serving(Handler) as url:
        yield url, received


def _args(url: str, **overrides: Any) -> SimpleNamespace:
    values = {"rm_url": url, "rm_max_retries": 3, "rm_retry_backoff": 0.01, "rm_request_timeout": 2.0}
    return SimpleNamespace(**(values | overrides))


def test_server_answers_number_and_dicts() -> None:
    def judge(n: int, payload: dict) -> tuple[int, str]:
        return 200, json.dumps(1.0 if payload["response"] == payload["label"] else 0.25)

    with reward_server(judge) as (url, got):
        assert score(remote.reward, "42", "42", _args(url)) == 1.0
        assert score(remote.reward, "41", "42", _args(url)) == 0.25
        assert got[0] == {"prompt": "q", "response": "42", "label": "42"}
    with reward_server(lambda n, p: (200, json.dumps({"reward": 0.5, "extra": 1}))) as (url, _):
        assert score(remote.reward, "a", "b", _args(url)) == 0.5
    with reward_server(lambda n, p: (200, json.dumps({"score": -1}))) as (url, _):
        assert score(remote.reward, "a", "b", _args(url)) == -1.0
    with reward_server(lambda n, p: (200, json.dumps({"acc": True, "pred": "x"}))) as (url, _):
        assert score(remote.reward, "a", "b", _args(url)) == {"acc": True, "pred": "x"}


def test_server_failing_twice_then_answering() -> None:
    def answer(n: int, payload: dict) -> tuple[int, str]:
        return (500, "{}") if n <= 2 else (200, "0.75")

    with reward_server(answer) as (url, got):
        assert score(remote.reward, "a", "b", _args(url)) == 0.75
        assert len(got) == 3  # succeeded on the third attempt


def test_silent_server_raises_clear_error_after_retries() -> None:
    def answer(n: int, payload: dict) -> tuple[int, str]:
        time.sleep(0.6)  # well past the client's 0.2 s timeout
        return 200, "1.0"

    start = time.monotonic()
    with reward_server(answer) as (url, got):
        with pytest.raises(RuntimeError) as info:
            score(remote.reward, "a", "b", _args(url, rm_max_retries=2, rm_request_timeout=0.2))
        assert len(got) == 3
    message = str(info.value)
    assert url in message and "3 attempts" in message and "timed out" in message.lower(), message
    assert time.monotonic() - start < 3.0


def test_client_errors_are_not_retried_and_garbage_is_reported() -> None:
    with reward_server(lambda n, p: (400, "bad")) as (url, got):
        with pytest.raises(RuntimeError, match="HTTP 400"):
            score(remote.reward, "a", "b", _args(url))
        assert len(got) == 1
    with reward_server(lambda n, p: (200, "not json")) as (url, _):
        with pytest.raises(RuntimeError, match="other than JSON"):
            score(remote.reward, "a", "b", _args(url))


def test_unreachable_server_and_missing_url() -> None:
    with reward_server(lambda n, p: (200, "1")) as (url, _):
        pass  # the port is closed again: nothing listens there now
    with pytest.raises(RuntimeError, match="in 2 attempts"):
        score(remote.reward, "a", "b", _args(url, rm_max_retries=1))
    with pytest.raises(UsageError, match="--rm-url"):
        score(remote.reward, "a", "b", SimpleNamespace(rm_url=None))


@contextmanager
def raw_server(handle: Any) -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A server whose ``handle(handler, n)`` writes the whole answer; records (method, path, body)."""
    seen: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, body))
            try:
                handle(self, len(seen))
            except OSError:
                pass

        do_POST = do_GET = _any  # noqa: N815 (http.server's naming)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        yield url, seen


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> Any:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_to_another_host_are_refused(code: int) -> None:
    with raw_server(answer(200, b"1.0")) as (other, other_seen):
        away = other.replace("127.0.0.1", "localhost")  # another host name, same machine
        with raw_server(answer(code, headers={"Location": away})) as (url, seen):
            with pytest.raises(RuntimeError, match=rf"redirected \(HTTP {code}\) to http://localhost:"):
                score(remote.reward, "a", "b", _args(url))
            assert len(seen) == 1  # a refused redirect is not retried
        assert other_seen == []


@pytest.mark.parametrize("code", [301, 302, 303])
def test_other_redirects_are_refused_even_to_the_same_host(code: int) -> None:
    with raw_server(answer(code, headers={"Location": "/elsewhere"})) as (url, seen):
        with pytest.raises(RuntimeError, match=rf"redirected \(HTTP {code}\).*only 307/308"):
            score(remote.reward, "a", "b", _args(url))
        assert [(m, p) for m, p, _ in seen] == [("POST", "/reward")]


@pytest.mark.parametrize("code", [307, 308])
def test_307_and_308_to_the_same_host_keep_method_and_body(code: int) -> None:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        if h.path == "/reward":
            answer(code, headers={"Location": "/v2/reward"})(h, n)
        else:
            answer(200, b'{"reward": 0.5}')(h, n)

    with raw_server(handle) as (url, seen):
        assert score(remote.reward, "42", "42", _args(url)) == 0.5
    assert [(m, p) for m, p, _ in seen] == [("POST", "/reward"), ("POST", "/v2/reward")]
    assert json.loads(seen[1][2]) == {"prompt": "q", "response": "42", "label": "42"}


def test_redirect_loops_stop() -> None:
    with raw_server(answer(307, headers={"Location": "/reward"})) as (url, seen):
        with pytest.raises(RuntimeError, match="refused the request with HTTP 307"):
            score(remote.reward, "a", "b", _args(url))
    assert len(seen) <= remote.MAX_REDIRECTS + 2


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
def test_oversized_answers_are_refused(length: bool) -> None:
    big = b"[" + b"1," * remote.MAX_BODY_BYTES + b"1]"
    with raw_server(answer(200, big, length=length)) as (url, seen):
        with pytest.raises(RuntimeError, match="more than the 1048576 bytes") as info:
            score(remote.reward, "a", "b", _args(url))
        assert len(seen) == 1 and len(str(info.value)) < 300
    if length:  # refused by its Content-Length, before reading it
        assert f"answered {len(big)} bytes" in str(info.value)


def test_errors_quote_a_short_excerpt_and_hide_the_query() -> None:
    long = ("x" * 5000).encode()
    with raw_server(answer(400, b"bad label: " + long)) as (url, _):
        with pytest.raises(RuntimeError) as info:
            score(remote.reward, "a", "b", _args(url + "?token=s3cret"))
    message = str(info.value)
    assert "HTTP 400 Bad Request: 'bad label: xxx" in message and len(message) < 300, message
    assert "s3cret" not in message and url in message
    for body in (long, b'"just text"', b'{"reward": "high"}'):
        with raw_server(answer(200, body)) as (url, _):
            with pytest.raises(RuntimeError) as info:
                score(remote.reward, "a", "b", _args(url))
        assert len(str(info.value)) < 300, info.value


def test_only_http_urls_are_accepted() -> None:
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/r", "127.0.0.1:8000/reward", "http:///reward"):
        with pytest.raises(UsageError, match="--rm-url"):
            score(remote.reward, "a", "b", _args(url))


def test_retries_and_backoff_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(remote.asyncio, "sleep", no_wait)
    with raw_server(answer(503, b"busy")) as (url, seen):
        with pytest.raises(RuntimeError, match=f"in {remote.MAX_RETRIES + 1} attempts.*HTTP 503"):
            score(remote.reward, "a", "b", _args(url, rm_max_retries=1000, rm_retry_backoff=1000.0))
    assert len(seen) == remote.MAX_RETRIES + 1
    assert len(waits) == remote.MAX_RETRIES and max(waits) == remote.MAX_BACKOFF_S


def test_too_many_requests_is_retried() -> None:
    def handle(h: BaseHTTPRequestHandler, n: int) -> None:
        answer(429, b"slow down")(h, n) if n <= 2 else answer(200, b"0.25")(h, n)

    with raw_server(handle) as (url, seen):
        assert score(remote.reward, "a", "b", _args(url)) == 0.25
    assert len(seen) == 3
