"""Real `miles serve` processes for tests: start on a free port, wait until they answer, stop at teardown.

``with miles_serve(ckpt, tmp_path, n=2) as servers:`` starts ``n`` servers at once (their model loads
overlap), waits (bounded) for each port file, and stops every process it started, however the block
ends. `ServeProcess.kill` sends SIGKILL for fault tests. `http_json` is a blocking JSON request for
talking to a server from the test's own thread.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def serve_env(**extra: str) -> dict[str, str]:
    """The test's environment with the repo and its plugins first on PYTHONPATH, one thread per process."""
    paths = [str(REPO), *(str(p) for p in sorted((REPO / "plugins").iterdir()) if p.is_dir())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])
    return env


class ServeProcess:
    """One ``python -m miles_core.cli serve`` process; its output goes to ``workdir/serve.log``."""

    def __init__(self, ckpt: Path, workdir: Path, *flags: str, port: int = 0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port_file, self.log_path = workdir / "port", workdir / "serve.log"
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", str(ckpt)]
        cmd += ["--port", str(port), "--port-file", str(self.port_file), *flags]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=serve_env(), cwd=REPO)
        self.url: str | None = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 120.0) -> str:
        """Wait for the port file (written once the server accepts requests); returns the server's url."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
                return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(f"miles serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"miles serve did not start within {timeout:g} s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the process to end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def miles_serve(
    ckpt: Path, workdir: Path, *flags: str, n: int = 1, timeout: float = 120.0
) -> Iterator[list[ServeProcess]]:
    """``n`` ready `miles serve` processes on free ports (in ``workdir/serve<i>``), stopped at exit."""
    procs: list[ServeProcess] = []
    try:
        for i in range(n):
            procs.append(ServeProcess(ckpt, workdir / f"serve{i}", *flags))
        for p in procs:
            p.wait_ready(timeout)
        yield procs
    finally:
        for p in procs:
            p.stop()


def http_json(method: str, url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One blocking request; returns (HTTP status, decoded JSON answer or None if the body is not JSON).
    ``body`` is sent as JSON, or as is when it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, None
