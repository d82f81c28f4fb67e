"""The rollout backends over HTTP: ``--rollout-backend http`` (engines are `miles serve` processes) and
``sglang`` (real SGLang servers). Both speak SGLang's native API through one client, `HttpEngine`.

Engines are started by the run (``--rollout-num-engines N`` local processes, see `launch`), given by
address (``--rollout-engine-urls``), or reached through a running router (``--sglang-router-ip/-port``).
Requests go through a `WorkerPool` (least in flight, health checks, a failed request retried on another
engine). A watcher thread restarts a local engine whose process died, brings it to the current weights
and puts it back in the pool (``engine_restarts`` in `metrics`).

The client owns an event loop on a background thread: the aiohttp sessions and the pool live there, so
`generate` works from any caller's loop (the rollout manager runs one ``asyncio.run`` per rollout) and
the blocking calls (`update_weights`, `abort`, ...) from any thread.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import uuid
import weakref
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from miles_core.engine.sequence import EngineOutput
from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.serve import launch
from miles_core.serve.pool import WorkerPool, normalize_url
from miles_core.serve.protocol import parse_generate_response
from miles_core.serve.remote import LoopThread, get_json, router_workers
from miles_core.serve.updater import BUCKET_BYTES, WeightUpdater
from miles_core.train.checkpoint import start_weights
from miles_core.types import RolloutOptions

log = get_logger(__name__)
MAX_RESTART_FAILURES = 5  # restarts of one engine that fail in a row before it is given up


def check_flags(args: argparse.Namespace) -> None:
    """The serving flags' combinations (one sentence each)."""
    if args.rollout_num_engines < 1:
        raise UsageError(f"--rollout-num-engines {args.rollout_num_engines} must be at least 1.")
    if (args.sglang_router_ip is None) != (args.sglang_router_port is None):
        raise UsageError("--sglang-router-ip and --sglang-router-port go together; pass both or neither.")
    if args.sglang_router_ip is not None and args.rollout_engine_urls:
        raise UsageError(
            "--rollout-engine-urls and --sglang-router-ip both say where the engines are; pass one of them."
        )
    if args.rollout_health_check_interval <= 0:
        raise UsageError(
            f"--rollout-health-check-interval {args.rollout_health_check_interval} must be positive."
        )


class HttpEngine:
    """The rollout backend ``http``: engines behind SGLang's HTTP API, `miles serve` processes by default.

    :param urls: the engines (``http://host:port``); requests go to them, or to ``router`` when given.
    :param fleet: the local engine processes this run started (restarted when one dies), if any.
    :param router: a running router's URL: requests go there; control requests go to its workers.
    :param weights: the HF folder the engines serve at start.
    """

    in_process = False  # the engines load their own weights (from_args gets no model)

    name = "http"
    default_update_mode = "distributed"  # the fastest (bench/weight_update.py); tensor needs no extra port
    # miles draws each request's sampling seed (so retries and resumed runs repeat their samples);
    # a server that rejects unknown sampling parameters does not get one.
    sends_seeds = True

    def __init__(
        self,
        args: argparse.Namespace,
        urls: list[str],
        *,
        weights: str,
        fleet: launch.EngineFleet | None = None,
        router: str | None = None,
        updater: Any = None,
    ) -> None:
        self.args = args
        self.fleet = fleet
        self.router = router
        self._urls = [normalize_url(u) for u in urls]
        self._bg = LoopThread(f"miles-{self.name}-client")
        wait = fleet.start_timeout if fleet is not None else 30.0
        interval = args.rollout_health_check_interval
        self.pool = WorkerPool(
            [router] if router else self._urls,
            health_check_interval=interval,
            wait_healthy_s=wait,
            on_revive=None if router else partial(_revived, weakref.ref(self)),
        )
        self._seeds = random.Random(args.rollout_seed)
        self._tokens = 0
        self._restarts = 0  # engines restarted, caught up and back in the pool
        self._capture_routes = False
        self._paused = False  # by pause_generation, until continue_generation
        self._lock = threading.Lock()  # one weight change at a time: an update, or catching up a restart
        self._closing = threading.Event()
        # Another sender of the weights (the trainer ranks of a scaled-out run) may take this one's place.
        mode = args.update_weights_mode or self.default_update_mode
        self.updater = updater or WeightUpdater(
            mode,
            self._bg,
            weights,
            Path(args.run_dir) / "rollout_weights",
            bucket_bytes=args.update_weight_buffer_size if mode == "distributed" else BUCKET_BYTES,
            ranks_per_engine=self.ranks_per_engine(args),
        )
        # Whatever happens (close, garbage collection, interpreter exit), the engines and threads stop.
        self._finalizer = weakref.finalize(self, _shutdown, self._closing, fleet, self._bg)
        self._watcher: threading.Thread | None = None
        if fleet is not None:
            self._watcher = threading.Thread(
                target=_watch,
                args=(weakref.ref(self), self._closing, interval),
                name="miles-engines",
                daemon=True,
            )
            self._watcher.start()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: torch.nn.Module | None, tokenizer: Any) -> HttpEngine:
        """Start (or reach) the engines the flags ask for. ``model`` is not kept: the engines load their
        weights from ``--hf-checkpoint`` (or the checkpoint a resumed run starts from)."""
        cls.check_flags(args)
        weights = start_weights(args)
        if args.sglang_router_ip is not None:
            router = normalize_url(f"http://{args.sglang_router_ip}:{args.sglang_router_port}")
            return cls(args, router_workers(router), weights=weights, router=router)
        if args.rollout_engine_urls:
            return cls(args, list(args.rollout_engine_urls), weights=weights)
        fleet = cls.start_fleet(args, weights)
        try:
            return cls(args, fleet.start(), weights=weights, fleet=fleet)
        except BaseException:
            fleet.stop()
            raise

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> None:
        check_flags(args)

    @classmethod
    def start_fleet(cls, args: argparse.Namespace, weights: str) -> launch.EngineFleet:
        """``--rollout-num-engines`` local `miles serve` processes, configured by the run's flags."""
        from miles_core.args import build_parser
        from miles_core.plugins import get_plugin_manager

        run_dir = Path(args.run_dir)
        known = {a.dest for a in build_parser(get_plugin_manager(disable=args.disable_plugins))._actions}
        config = launch.write_server_config(args, run_dir / "engines" / "serve.yaml", known)
        commands = [
            partial(launch.miles_serve_command, args, weights, config, run_dir / "engines" / f"port-{i}")
            for i in range(args.rollout_num_engines)
        ]
        return launch.EngineFleet(commands, run_dir / "engines")

    @staticmethod
    def ranks_per_engine(args: argparse.Namespace) -> int:
        return 1

    # ---------------------------------------------------------------- RolloutBackend

    @property
    def weight_version(self) -> int:
        return self.updater.version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        """A resumed run's version: the engines serve its checkpoint's weights under that number."""
        if version != self.updater.version:
            with self._lock:
                self.updater.relabel(version)
                self._send(self.engine_urls())

    async def generate(
        self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None
    ) -> EngineOutput:
        """Sample a continuation on the least-loaded engine (retried on another if that one fails)."""
        params = dict(sampling_params)
        if self.sends_seeds and params.get("sampling_seed") is None:
            params["sampling_seed"] = self._seeds.getrandbits(31)  # drawn in call order, as the engine does
        body: dict[str, Any] = {
            "input_ids": list(input_ids),
            "sampling_params": params,
            "return_logprob": True,
            "rid": rid or uuid.uuid4().hex,
        }
        if self._capture_routes:
            body["return_routed_experts"] = True
        answer = await asyncio.wrap_future(self._bg.submit(self.pool.generate(body)))
        out = parse_generate_response(answer)
        self._tokens += len(out.output_ids)
        return out

    def set_rollout_options(self, options: RolloutOptions) -> None:
        """Route capture is asked per request; a decode strategy runs inside each server (its plugins)."""
        self._capture_routes = options.capture_routes

    def reseed(self, seed: int) -> None:
        self._seeds.seed(seed)

    @property
    def generated_tokens(self) -> int:
        return self._tokens

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push new weights to every engine (``--update-weights-mode``), generation paused in place
        meanwhile; on return every engine serves ``version``. A local engine that dies meanwhile is
        caught up when it is back."""
        with self._lock:
            urls = self.engine_urls()
            pausing = not self._paused  # a caller's pause stays until its continue_generation
            if pausing:
                self._all(urls, "/pause_generation", {"mode": "in_place"}, skip_dead=True)
            try:
                try:  # kept and sent in one pass: over NCCL each bucket is broadcast as it comes
                    self.updater.push(urls, named_tensors, version)
                except Exception:
                    down = self._down(urls)
                    if not down:
                        raise
                    self._send([u for u in urls if u not in down])  # what push kept, to the others
            finally:
                if pausing:
                    self._all(urls, "/continue_generation", {}, skip_dead=True)

    # ---------------------------------------------------------------- control

    def engine_urls(self) -> list[str]:
        """The engines now serving (a router's workers are asked for); not those being restarted."""
        return router_workers(self.router) if self.router else [u for u in self._urls if u]

    def abort(self, rid: str | None = None) -> int:
        """Finish request ``rid`` (all when None) with what it has; returns how many were aborted."""
        body = {"abort_all": True} if rid is None else {"rid": rid}
        return sum(
            int(a.get("num_aborted", 0)) for a in self._all(self.engine_urls(), "/abort_request", body)
        )

    def pause_generation(self, mode: str = "in_place") -> int:
        """Pause every engine (``in_place`` or ``abort``); returns how many requests were aborted."""
        if mode not in ("in_place", "abort"):
            raise UsageError(f"pause mode {mode!r} is not one of in_place, abort.")
        self._paused = True
        answers = self._all(self.engine_urls(), "/pause_generation", {"mode": mode})
        return sum(int(a.get("num_aborted", 0)) for a in answers)

    def continue_generation(self) -> None:
        self._paused = False
        self._all(self.engine_urls(), "/continue_generation", {})

    def release_memory(self) -> None:
        """Every engine gives its device memory back (colocated training takes the device meanwhile)."""
        self._all(self.engine_urls(), "/release_memory_occupation", {}, skip_dead=True)

    def resume_memory(self, urls: list[str] | None = None) -> None:
        """The engines ``urls`` (default all) take their memory back, before weights are loaded into them."""
        self._all(
            self.engine_urls() if urls is None else urls, "/resume_memory_occupation", {}, skip_dead=True
        )

    def metrics(self) -> dict[str, float]:
        """``engine_restarts`` (local engines restarted after dying), ``retries`` (requests re-sent to
        another engine), ``engines``, ``healthy_engines``."""
        return {
            "engine_restarts": float(self._restarts),
            "retries": float(self.pool.retries),
            "engines": float(len(self._urls)),
            "healthy_engines": float(len(self.pool.healthy)),
        }

    def close(self) -> None:
        """Stop the engines this run started and the client's threads. Safe to call twice."""
        if not self._finalizer.alive:
            return
        self._closing.set()
        if self.fleet is None:
            try:
                self.updater.close()
            except Exception as e:  # engines we do not own may already be gone
                log.warning("leaving the weight update group failed: %s", e)
        self._bg.run(self._close_sessions())  # no health checks of engines that are being stopped
        self._finalizer()
        if self._watcher is not None:
            self._watcher.join(30)

    def __enter__(self) -> HttpEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- internals

    async def _close_sessions(self) -> None:
        await self.pool.close()
        await self._bg.close_session()

    def _all(self, urls: list[str], path: str, body: dict, skip_dead: bool = False) -> list[dict]:
        """``path`` on every engine at once; with ``skip_dead``, an engine that is down is left out."""
        answers = self._bg.post_all(urls, path, body)
        failed = [u for u, a in zip(urls, answers) if isinstance(a, BaseException)]
        down = self._down(failed) if skip_dead else set()
        for url, a in zip(urls, answers):
            if isinstance(a, BaseException) and url not in down:
                raise a
        return [a for a in answers if not isinstance(a, BaseException)]

    def _down(self, urls: list[str]) -> set[str]:
        """Those of ``urls`` that are down: a local engine whose process died, or one that does not answer
        ``/health``. Each is caught up when it is back (restarted, or revived in the pool)."""
        dead = (
            {normalize_url(e.url) for e in self.fleet.engines if e.url and not e.alive()}
            if self.fleet
            else set()
        )
        return {u for u in urls if u in dead or not launch.answers_health(u)}

    def _send(self, urls: list[str]) -> None:
        """The current weights to ``urls``; engines that are down are left to catch up when back."""
        while True:
            try:
                return self.updater.send(urls)
            except Exception:
                down = self._down(urls)
                if not down:
                    raise
                log.warning(
                    "rollout engines %s are down; the weight update goes on without them", sorted(down)
                )
                urls = [u for u in urls if u not in down]

    def _catch_up(self, url: str) -> None:
        with self._lock:
            if str(get_json(url + "/get_server_info").get("weight_version")) != str(self.updater.version):
                log.warning("rollout engine %s is back; loading weight version %d", url, self.updater.version)
                self.updater.send([url])

    def _replace(self, i: int) -> None:
        with self._lock:  # no weight update is sent to it from now on
            old, self._urls[i] = self._urls[i], None
        self._bg.run(_async(lambda: old in self.pool.urls and self.pool.remove(old)))
        url = normalize_url(self.fleet.restart(i))
        with self._lock:
            try:
                self.updater.send([url])
                if self._paused:  # paused like the others until continue_generation
                    self._all([url], "/pause_generation", {"mode": "in_place"})
            except BaseException:
                self.fleet.engines[i].stop()  # found dead at the next check, and restarted again
                raise
            self._urls[i] = url
            self._bg.run(_async(lambda: self.pool.add(url)))
            self._restarts += 1
        log.warning("rollout engine #%d is back at %s (weight version %d)", i, url, self.updater.version)


async def _async(fn: Any) -> Any:
    return fn()


async def _revived(ref: weakref.ref[HttpEngine], url: str) -> None:
    """The pool's ``on_revive``: an engine back after failing its checks gets the current weights. (The
    pool's task holds the client only weakly.)"""
    client = ref()
    if client is not None:
        await asyncio.to_thread(client._catch_up, url)


def _watch(ref: weakref.ref[HttpEngine], closing: threading.Event, interval: float) -> None:
    """The watcher thread: restart every local engine whose process died, catch it up, put it back in
    the pool. Holds the client only weakly, so a client nobody closed can still be collected."""
    failures: dict[int, int] = {}
    while not closing.wait(interval):
        client = ref()
        if client is None:
            return
        for i in client.fleet.dead():
            if closing.is_set() or failures.get(i, 0) >= MAX_RESTART_FAILURES:
                continue
            try:
                client._replace(i)
                failures[i] = 0
            except Exception as e:  # tried again at the next check
                if closing.is_set():  # stopped on purpose
                    return
                failures[i] = failures.get(i, 0) + 1
                given_up = "; giving up on it" if failures[i] >= MAX_RESTART_FAILURES else ""
                log.error("restarting rollout engine #%d failed: %s%s", i, e, given_up)
        del client


def _shutdown(closing: threading.Event, fleet: launch.EngineFleet | None, bg: LoopThread) -> None:
    closing.set()
    bg.stop()
    if fleet is not None:
        fleet.stop()


class SGLangEngine(HttpEngine):
    """The rollout backend ``sglang``: the same client, with the run's engines launched as SGLang servers
    (``python -m sglang.launch_server`` with every ``--sglang-*`` flag passed through)."""

    name = "sglang"
    default_update_mode = "disk"  # SGLang's tensor updates take pickles, which miles never sends
    sends_seeds = False

    @classmethod
    def start_fleet(cls, args: argparse.Namespace, weights: str) -> launch.EngineFleet:
        launch.require_sglang()
        commands = [partial(launch.sglang_command, args, weights, i) for i in range(args.rollout_num_engines)]
        return launch.EngineFleet(commands, Path(args.run_dir) / "engines")

    @staticmethod
    def ranks_per_engine(args: argparse.Namespace) -> int:
        return launch.sglang_tp_size(args)

    @classmethod
    def check_flags(cls, args: argparse.Namespace) -> None:
        check_flags(args)
        if args.update_weights_mode == "tensor":
            raise UsageError(
                "--update-weights-mode tensor sends safetensors, which SGLang does not read; use disk or "
                "distributed with --rollout-backend sglang."
            )


__all__ = ["HttpEngine", "SGLangEngine"]
