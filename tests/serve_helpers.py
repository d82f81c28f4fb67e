"""Start real `miles serve` processes on 127.0.0.1 for tests, and always stop them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def start_server(ckpt: Path, workdir: Path, *flags: str, deadline_s: float = 120.0) -> Served:
    """A `miles serve` process on a free port; returns once it answers /health (or raises with its log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"port.{time.monotonic_ns()}"
    log = port_file.with_suffix(".log")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", str(ckpt), "--port", "0",
           "--port-file", str(port_file), "--device", "cpu", *flags]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
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
