"""Start real `miles serve` processes on 127.0.0.1 for tests, and always stop them.

`served` / `served_many` start one or ``n`` servers (their model loads overlap) and stop them however the
block ends; `start_server` / `stop_server` for a test that kills (`Served.kill`, SIGKILL) or restarts one.
`http_json` is a blocking JSON request to any url (a server, a router).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def http_json(method: str, url: str, body: Any = None, timeout: float = 120.0) -> tuple[int, Any]:
    """One blocking request; returns (HTTP status, the decoded JSON answer, or None for an empty or
    non-JSON body). ``body`` is sent as JSON, or as is when it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, None


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log: Path

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            text = r.read().decode()
        return json.loads(text) if text else {}

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        status, answer = http_json("POST", self.url + path, body or {})
        return status, answer or {}

    def kill(self) -> None:
        """SIGKILL (a crash), then wait for the process to end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def serve_env() -> dict[str, str]:
    """This interpreter's environment for a child: the same sys.path, one thread per process."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def launch_server(ckpt: Path, workdir: Path, *flags: str, port: int = 0) -> tuple[subprocess.Popen, Path]:
    """Start a `miles serve` process (``port`` 0: a free one); returns it and its port file."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"serve-{time.monotonic_ns()}.port"
    cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", str(ckpt), "--port", str(port),
           "--port-file", str(port_file), "--device", "cpu", *flags]  # fmt: skip
    log = port_file.with_suffix(".log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=serve_env(), cwd=REPO)
    log.close()
    return proc, port_file


def wait_server(proc: subprocess.Popen, port_file: Path, deadline_s: float = 120.0) -> Served:
    """Returns once the server answers /health (or stops it and raises with its log)."""
    log = port_file.with_suffix(".log")
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"miles serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if port_file.is_file():
            served = Served(proc, f"http://127.0.0.1:{port_file.read_text().strip()}", log)
            with contextlib.suppress(OSError):
                served.get("/health")
                return served
        time.sleep(0.05)
    stop_server(Served(proc, "", log))
    raise RuntimeError(f"miles serve did not come up in {deadline_s} s:\n{log.read_text()[-3000:]}")


def start_server(ckpt: Path, workdir: Path, *flags: str, port: int = 0, deadline_s: float = 120.0) -> Served:
    """A ready `miles serve` process (on ``port``, 0: a free one)."""
    return wait_server(*launch_server(ckpt, workdir, *flags, port=port), deadline_s)


def stop_server(served: Served) -> None:
    if served.proc.poll() is None:
        served.proc.terminate()
        try:
            served.proc.wait(10)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait(10)


@contextlib.contextmanager
def served(ckpt: Path, workdir: Path, *flags: str) -> Iterator[Served]:
    s = start_server(ckpt, workdir, *flags)
    try:
        yield s
    finally:
        stop_server(s)


@contextlib.contextmanager
def served_many(ckpt: Path, workdir: Path, n: int, *flags: str) -> Iterator[list[Served]]:
    """``n`` ready servers, started at once; all stopped at exit."""
    launched = [launch_server(ckpt, workdir, *flags) for _ in range(n)]
    try:
        yield [wait_server(proc, port_file) for proc, port_file in launched]
    finally:
        for proc, port_file in launched:
            stop_server(Served(proc, "", port_file.with_suffix(".log")))
