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

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/reward", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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
