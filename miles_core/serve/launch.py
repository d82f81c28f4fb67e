"""Local rollout engine processes: start `miles serve` (or SGLang) servers, wait until they are healthy,
notice one that died, restart it, and stop them all.

Each engine is a child process in its own session (so a signal meant for the trainer does not reach
it, and stopping it stops whatever it spawned), logging to ``<run-dir>/engines/engine-<i>.log``. Every
engine is stopped (SIGTERM, then SIGKILL after a grace period) by `EngineFleet.stop`, and also when the
fleet is garbage-collected or the interpreter exits, so no server outlives the run that started it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from miles_core.atomic import atomic_write_text
from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint into SGLang takes minutes
STOP_GRACE_S = 10.0
# Flags that are not written to the server's config file: `config` itself, the weights (given as
# --hf-checkpoint), --disable-plugins (read from the command line before the plugins load), and the
# flags that only mean something to the process that starts engines (the server is the built-in engine,
# whichever backend talks to it).
_NOT_IN_CONFIG = {
    "config",
    "hf_checkpoint",
    "disable_plugins",
    "rollout_backend",
    "rollout_num_engines",
    "rollout_engine_urls",
    "sglang_router_ip",
    "sglang_router_port",
    "sglang_server_args",
}
# --sglang-* flags of ours (how to reach a router), not SGLang server flags.
_OWN_SGLANG_FLAGS = {"sglang_router_ip", "sglang_router_port", "sglang_server_args"}

Command = Callable[[], tuple[list[str], str | None, Path | None]]
"""Builds a fresh start command: ``(argv, url or None, port file or None)``; the url is known up front
(SGLang, on a port picked here) or read from the port file once the server is up (`miles serve`)."""


def _yaml_safe(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, (list, tuple)) and all(_yaml_safe(v) for v in value)


def write_server_config(args: argparse.Namespace, path: Path, known: set[str] | None = None) -> Path:
    """Write the run's flags (``vars(args)``) as the YAML ``--config`` of `miles serve`.

    ``known``: the flag destinations the server's parser accepts (others, such as attributes a plugin
    derived, are left out); values YAML cannot hold are left out too.
    """
    data = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in sorted(vars(args).items())
        if k not in _NOT_IN_CONFIG and (known is None or k in known) and _yaml_safe(v)
    }
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=True))
    return path


def miles_serve_command(
    args: argparse.Namespace, weights: str, config: Path, port_file: Path
) -> tuple[list[str], str | None, Path]:
    """``python -m miles_core.cli serve --config ... --hf-checkpoint ... --port 0 --port-file ...``."""
    argv = [sys.executable, "-m", "miles_core.cli", "serve", "--config", str(config)]
    argv += ["--hf-checkpoint", weights, "--port", "0", "--port-file", str(port_file)]
    for names in args.disable_plugins or []:
        argv += ["--disable-plugins", names]
    return argv, None, port_file


def sglang_flags(args: argparse.Namespace) -> list[str]:
    """Every ``--sglang-*`` flag of the run, for SGLang's own parser (``--sglang-`` -> ``--``).

    The ones no parser of miles knows come raw (``args.sglang_server_args``); those a plugin declares
    (``--sglang-speculative-*``) are passed when set.
    """
    out: list[str] = []
    for dest, value in sorted(vars(args).items()):
        if not dest.startswith("sglang_") or dest in _OWN_SGLANG_FLAGS or value is None or value is False:
            continue
        flag = "--" + dest.removeprefix("sglang_").replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    for token in args.sglang_server_args or []:
        out.append("--" + token.removeprefix("--sglang-") if token.startswith("--sglang-") else token)
    return out


def require_sglang() -> None:
    """Raise the one-sentence `UsageError` if SGLang cannot be imported."""
    try:
        import sglang  # noqa: F401
    except ImportError as err:
        raise UsageError(
            f"--rollout-backend sglang needs SGLang, which is not importable here ({err}); install it on a "
            'GPU machine with `pip install "sglang[all]"`, or use --rollout-backend http.'
        ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for servers that cannot pick their own and report it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sglang_tp_size(args: argparse.Namespace) -> int:
    """The tensor-parallel size the run passes SGLang (``--sglang-tp-size N`` or ``--sglang-tp N``): the
    GPUs, and the weight-update ranks, of one engine."""
    raw = list(args.sglang_server_args or [])
    for i, token in enumerate(raw):
        name, _, value = token.partition("=")
        if name in ("--sglang-tp-size", "--sglang-tp"):
            value = value or (raw[i + 1] if i + 1 < len(raw) else "")
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"{name} {value!r} must be a positive integer.")
            return int(value)
    return 1


def sglang_command(args: argparse.Namespace, weights: str, index: int = 0) -> tuple[list[str], str, None]:
    """``python -m sglang.launch_server --model-path ... --port ... --host 127.0.0.1`` plus the run's
    ``--sglang-*`` flags; engine ``index`` starts at GPU ``index * tp size`` unless the run says where
    (``--sglang-base-gpu-id``)."""
    port = free_port()
    argv = [sys.executable, "-m", "sglang.launch_server", "--model-path", weights]
    argv += ["--port", str(port), "--host", "127.0.0.1", *sglang_flags(args)]
    if not any(t.split("=")[0] == "--base-gpu-id" for t in argv):
        argv += ["--base-gpu-id", str(index * sglang_tp_size(args))]
    return argv, f"http://127.0.0.1:{port}", None


def _stop(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process's session, then SIGKILL it if it has not exited within ``grace`` seconds.

    A process that already exited may have left children of its own (SGLang's schedulers): its session
    is killed outright."""
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def answers_health(url: str, timeout: float = 5.0) -> bool:
    """Whether the server at ``url`` answers ``GET /health`` with 200 now."""
    return _get_ok(url + "/health", timeout)


def _get_ok(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _child_env() -> dict[str, str]:
    """This environment, with this process's import path: the engine imports the same miles (and
    plugins) as the run that starts it, installed or from a source tree."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


class EngineProcess:
    """One engine server process: start, wait until ``/health`` answers, stop."""

    def __init__(self, name: str, command: Command, log_path: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._port_file: Path | None = None
        self._finalizer: weakref.finalize | None = None

    def start(self) -> None:
        argv, self.url, self._port_file = self.command()
        if self._port_file is not None:
            self._port_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
            )
        # Stops the process when this object goes away or the interpreter exits, whatever happens.
        self._finalizer = weakref.finalize(self, _stop, self.proc)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """Block until the server answers ``GET /health``; returns its URL.

        :raises UsageError: the process exited first (its last log line says why), or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise UsageError(
                    f"rollout engine {self.name} exited with status {code} before it was ready "
                    f"({_last_line(self.log_path) or 'no output'}); see {self.log_path}."
                )
            if self.url is None and self._port_file is not None and self._port_file.is_file():
                port = self._port_file.read_text().strip()
                if port.isdigit():
                    self.url = f"http://127.0.0.1:{port}"
            if self.url is not None and _get_ok(self.url + "/health"):
                return self.url
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        self.stop()
        raise UsageError(
            f"rollout engine {self.name} was not healthy within {timeout:.0f} s; see {self.log_path}."
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _stop once; later calls do nothing


class EngineFleet:
    """N engine processes started by this run, with restart of one that died."""

    def __init__(
        self, commands: list[Command], log_dir: Path, start_timeout: float = START_TIMEOUT_S
    ) -> None:
        self.start_timeout = start_timeout
        self.engines = [
            EngineProcess(f"#{i}", c, log_dir / f"engine-{i}.log") for i, c in enumerate(commands)
        ]
        self.stopped = False

    def start(self) -> list[str]:
        """Start every engine at once, then wait for each; returns their URLs (stops all on failure)."""
        try:
            for e in self.engines:
                e.start()
            return [e.wait_ready(self.start_timeout) for e in self.engines]
        except BaseException:
            self.stop()
            raise

    @property
    def urls(self) -> list[str | None]:
        return [e.url for e in self.engines]

    def dead(self) -> list[int]:
        """Indices of engines whose process has exited."""
        return [i for i, e in enumerate(self.engines) if not e.alive()]

    def restart(self, i: int) -> str:
        """Start engine ``i`` again (on a new port) and wait until it is healthy; returns its URL."""
        e = self.engines[i]
        e.stop()
        log.warning("rollout engine %s (%s) died; restarting it (log: %s)", e.name, e.url, e.log_path)
        e.start()
        if self.stopped:  # stop() ran meanwhile: this one must not outlive it
            e.stop()
            raise RuntimeError(f"rollout engine {e.name} was not restarted: the engines are stopping.")
        return e.wait_ready(self.start_timeout)

    def stop(self) -> None:
        """Stop every engine: SIGTERM all first, so their grace periods run together."""
        self.stopped = True
        for e in self.engines:
            if e.alive():
                try:
                    os.killpg(e.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for e in self.engines:
            e.stop()
