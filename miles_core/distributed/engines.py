"""Rollout engines as Ray actors: each runs the `miles serve` server in its own actor process, on its
bundle of the run's placement group, logging to ``<run-dir>/engines/engine-<i>.log``.

`RayEngineFleet` has the interface of `miles_core.serve.launch.EngineFleet`, so
``HttpEngine(args, fleet.start(), weights=..., fleet=fleet)`` drives it unchanged: health, restart of an
engine that died (Ray restarts the actor, or a new one is made), stop. The server starts in the actor's
constructor, so an actor that Ray restarts serves again (on a new port) without being asked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

from miles_core.atomic import atomic_write_text
from miles_core.distributed.placement import Layout, Placement, import_ray
from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.serve import launch

log = get_logger(__name__)

MAX_RESTARTS = 3  # Ray restarts of one actor; after them `restart` makes a new actor
ALIVE_TIMEOUT_S = 10.0  # an engine that does not answer Ray within this is counted dead
STOP_TIMEOUT_S = 10.0
_SAID = "miles: error: "  # how a `UsageError` is printed (by the CLI, and in an engine's log)
# Flags that say where the run's processes go: the driver's business; each engine is one `miles serve`
# on the device Ray gave it.
_LAYOUT_DESTS = {
    "actor_num_nodes",
    "actor_num_gpus_per_node",
    "rollout_num_gpus",
    "rollout_num_gpus_per_engine",
    "colocate",
    "use_ray",
    "ray_address",
}


# ---------------------------------------------------------------- inside the actor


class EngineActor:
    """One engine's actor (made a Ray actor class by `RayEngineFleet`): in its constructor it sends its
    output to ``log_path``, parses the served flags as `miles serve` does (``config_text`` is the YAML of
    ``--config``, ``argv`` the rest), loads the model with the plugins and serves it on a thread of its own,
    on this node's address (127.0.0.1 on a local cluster) and a free port."""

    def __init__(
        self, name: str, log_path: str, config_text: str, argv: list[str], cwd: str, env: dict
    ) -> None:
        _output_to(Path(log_path), f"rollout engine {name} (Ray actor, pid {os.getpid()})")
        os.environ.update(env)
        with contextlib.suppress(OSError):  # relative paths of the run mean what they mean to the driver
            os.chdir(cwd)
        try:
            self._serve(Path(log_path).with_suffix(".yaml"), config_text, argv)
        except BaseException as e:
            traceback.print_exc()  # its last line, in the log, is the reason the driver reports
            if isinstance(e, UsageError):
                print(f"{_SAID}{e}", file=sys.stderr)  # as `miles serve` says it
            sys.stderr.flush()
            raise

    def _serve(self, config: Path, config_text: str, argv: list[str]) -> None:
        # The model's modules are imported here, in the actor: the driver imports this module without them.
        import miles_core
        from miles_core.args import parse_args
        from miles_core.plugins import configure_plugins, disabled_from_argv, get_plugin_manager
        from miles_core.serve.server import add_serve_arguments, build_app, build_server

        ray = import_ray()
        atomic_write_text(config, config_text)
        host = ray.util.get_node_ip_address()
        argv = ["--config", str(config), *argv, "--host", host, "--port", "0"]
        pm = get_plugin_manager(disable=disabled_from_argv(argv))
        args = parse_args(argv, pm, extra=add_serve_arguments, prog="miles serve")
        configure_plugins(pm, args)
        server = build_server(args, pm)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="miles-serve", daemon=True).start()
        start = asyncio.run_coroutine_threadsafe(_start_site(build_app(server), host), self.loop)
        self.runner, port = start.result()
        self.about = {
            "url": f"http://{host}:{port}",
            "pid": os.getpid(),
            "node_ip": host,
            "device": str(server.engine.device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "miles_core": miles_core.__file__,
        }
        log.info("serving on %s (device %s)", self.about["url"], self.about["device"])

    def info(self) -> dict[str, Any]:
        """``url``, ``pid``, ``node_ip``, ``device``, ``gpu_ids`` (Ray's, of this node) and the
        ``miles_core`` it imported."""
        return self.about


async def _start_site(app: Any, host: str) -> tuple[Any, int]:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, 0).start()
    return runner, runner.addresses[0][1]


def _output_to(path: Path, header: str) -> None:
    """Send this process's stdout and stderr (file descriptors too) to the end of ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {header}", flush=True)


# ---------------------------------------------------------------- the driver's side


class RayEngine:
    """One engine actor as the driver sees it: what `HttpEngine` reads of a fleet's engine (``name``,
    ``url``, ``log_path``, `alive`, `stop`), plus ``pid`` and ``node_ip`` of the process now serving."""

    def __init__(self, name: str, log_path: Path, make: Any) -> None:
        self.name = name
        self.log_path = log_path
        self._make = make  # () -> a new actor handle
        self.actor: Any = None
        self.url: str | None = None
        self.pid: int | None = None
        self.node_ip: str | None = None
        self.about: dict[str, Any] = {}

    def start(self) -> None:
        """Create the actor; its constructor loads the model meanwhile (see `wait_ready`)."""
        self.actor = self._make()
        self.url = self.pid = None

    def wait_ready(self, timeout: float) -> str:
        """Block until the actor has started its server and it answers ``GET /health``; returns its URL.

        :raises UsageError: the actor died first (its log's last line says why), or ``timeout`` passed.
        """
        ray = import_ray()
        deadline = time.monotonic() + timeout
        try:
            self._adopt(ray.get(self.actor.info.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            self.stop()
            raise self._not_ready(timeout) from None
        except ray.exceptions.RayError:
            self.stop()
            reason = _reason(self.log_path)
            raise UsageError(
                f"rollout engine {self.name} died before it was ready ({reason}); see {self.log_path}."
            ) from None
        delay = 0.05
        while not launch.answers_health(self.url):
            if time.monotonic() > deadline:
                self.stop()
                raise self._not_ready(timeout)
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        return self.url

    def _not_ready(self, timeout: float) -> UsageError:
        return UsageError(
            f"rollout engine {self.name} was not healthy within {timeout:.0f} s; see {self.log_path}."
        )

    def _adopt(self, about: dict[str, Any]) -> None:
        self.about = about
        self.url, self.pid, self.node_ip = about["url"], about["pid"], about["node_ip"]

    def restart(self, timeout: float) -> str:
        """Serve again, in a new process: the one Ray restarted the actor in, or a new actor (when it is
        out of restarts, was stopped, or its process lives on without serving); returns the new URL."""
        ray = import_ray()
        if self.actor is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                about = ray.get(self.actor.info.remote(), timeout=timeout)
                if about["pid"] != self.pid:
                    self._adopt(about)
                    return self.wait_ready(timeout)  # answers at once: it is the same process
        self.stop()
        self.start()
        return self.wait_ready(timeout)

    def alive(self) -> bool:
        """Whether the process that serves ``url`` is still running."""
        return _alive([self])[0]

    def stop(self) -> None:
        """Kill the actor for good (Ray does not restart it); `alive` is False from now on."""
        _kill([self])


def _reason(log_path: Path) -> str:
    """Why an engine died before serving: the `UsageError` sentence it logged, or its log's last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    said = [ln.removeprefix(_SAID) for ln in lines if ln.startswith(_SAID)]
    return (said or lines or ["no output"])[-1][:300]


def _alive(engines: list[RayEngine], timeout: float = ALIVE_TIMEOUT_S) -> list[bool]:
    """For each engine at once: does the actor answer, from the process that served its URL? (An actor
    Ray is restarting answers only once restarted, from a new process: dead, until `restart` adopts it.)"""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return [False] * len(engines)
    refs = []
    for e in engines:
        try:
            refs.append(e.actor.info.remote() if e.actor is not None and e.pid is not None else None)
        except Exception:  # the handle no longer works (Ray was shut down)
            refs.append(None)
    deadline = time.monotonic() + timeout
    out = []
    for e, ref in zip(engines, refs):
        try:
            out.append(
                ref is not None
                and ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))["pid"] == e.pid
            )
        except ray.exceptions.RayError:
            out.append(False)
    return out


def _kill(engines: list[RayEngine], timeout: float = STOP_TIMEOUT_S) -> None:
    """Kill the engines' actors (no restart), then wait until Ray has seen each die."""
    ray = sys.modules.get("ray")
    actors = [e.actor for e in engines if e.actor is not None]
    for e in engines:
        e.actor = None
    if not actors or ray is None or not ray.is_initialized():
        return  # gone with the cluster (or the connection) they were part of
    for a in actors:
        with contextlib.suppress(Exception):
            ray.kill(a, no_restart=True)
    deadline = time.monotonic() + timeout
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.info.remote(), timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.ActorDiedError:
                break
            except Exception:  # not yet dead, or no longer reachable
                time.sleep(0.05)
            else:
                time.sleep(0.05)


class RayEngineFleet(launch.EngineFleet):
    """The run's rollout engines as Ray actors on their bundles of ``placement``: a `launch.EngineFleet`
    (`start`, ``urls`` come from it) whose ``engines``, `dead`, `restart` and `stop` are Ray's. Every
    actor is killed by `stop`, also when the fleet is garbage-collected or the interpreter exits (and Ray
    kills them with the driver that owns them).

    :param args: the run's flags; the engines get them as a `miles serve` config (without the layout
        flags), on the layout's device kind.
    :param weights: the HF folder the engines serve (their ``--hf-checkpoint``).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        layout: Layout,
        placement: Placement,
        weights: str,
        start_timeout: float = launch.START_TIMEOUT_S,
    ) -> None:
        ray = import_ray()
        self.placement = placement  # its group lives as long as the engines in it
        self.start_timeout = start_timeout
        self.stopped = False
        run_dir = Path(args.run_dir).resolve()
        config_text = _config_text(args, layout, run_dir)
        if Path(weights).exists():
            weights = str(Path(weights).resolve())
        argv = ["--hf-checkpoint", weights]
        for names in args.disable_plugins or []:
            argv += ["--disable-plugins", names]
        env = {k: v for k, v in os.environ.items() if k.startswith("MILES_")}
        actor_class = ray.remote(EngineActor)

        def maker(j: int, log_path: Path) -> Any:
            # A call made while Ray restarts the actor waits for the new process (`info` is idempotent).
            options = dict(placement.engine_options(j), max_restarts=MAX_RESTARTS, max_task_retries=-1)
            args_ = (f"#{j}", str(log_path), config_text, argv, os.getcwd(), env)
            return lambda: actor_class.options(**options).remote(*args_)

        logs = [run_dir / "engines" / f"engine-{j}.log" for j in range(layout.num_engines)]
        self.engines = [RayEngine(f"#{j}", p, maker(j, p)) for j, p in enumerate(logs)]
        self._finalizer = weakref.finalize(self, _kill, self.engines)

    def dead(self) -> list[int]:
        """Indices of engines whose serving process has ended (Ray may be restarting it)."""
        return [i for i, ok in enumerate(_alive(self.engines)) if not ok]

    def restart(self, i: int) -> str:
        """Bring engine ``i`` back in a new process and wait until it is healthy; returns its URL."""
        e = self.engines[i]
        stopping = RuntimeError(f"rollout engine {e.name} was not restarted: the engines are stopping.")
        if self.stopped:
            raise stopping
        log.warning("rollout engine %s (%s) died; restarting it (log: %s)", e.name, e.url, e.log_path)
        url = e.restart(self.start_timeout)
        if self.stopped:  # stop() ran meanwhile: this one must not outlive it
            e.stop()
            raise stopping
        return url

    def stop(self) -> None:
        """Kill every engine actor and wait until Ray has seen them die. Safe to call twice."""
        self.stopped = True
        self._finalizer()


def _config_text(args: argparse.Namespace, layout: Layout, run_dir: Path) -> str:
    """The run's flags as the engines' ``--config`` YAML (what `miles serve` parses; layout flags left
    out), written to ``<run-dir>/engines/serve.yaml``."""
    from miles_core.args import build_parser
    from miles_core.plugins import get_plugin_manager

    known = {a.dest for a in build_parser(get_plugin_manager(disable=args.disable_plugins))._actions}
    served = argparse.Namespace(**{**vars(args), "device": layout.device, "run_dir": str(run_dir)})
    path = launch.write_server_config(served, run_dir / "engines" / "serve.yaml", known - _LAYOUT_DESTS)
    return path.read_text()


__all__ = ["EngineActor", "RayEngine", "RayEngineFleet"]
