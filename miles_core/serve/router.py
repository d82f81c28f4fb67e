"""`miles router`: one HTTP address in front of N engine servers, balancing them with a `WorkerPool`.

``POST /generate`` goes to the least-loaded healthy worker and is retried on another if that worker
fails; control requests (pause, continue, abort, flush, weight updates, memory release) go to every
healthy worker; ``/add_worker`` and ``/remove_worker`` change the set (SGLang router's names). Errors are
``{"error": {"message": "<one sentence>"}}`` with a 4xx (a worker's 4xx passes through as it was) or 502/503
when no worker could answer. `RouterThread` runs the same app on a background thread, in-process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from miles_core.atomic import atomic_write_text
from miles_core.errors import UsageError
from miles_core.flags import ArgumentParser, HelpFormatter
from miles_core.logging import get_logger
from miles_core.serve.pool import WorkerError, WorkerPool

log = get_logger(__name__)

BROADCAST = (
    "/flush_cache",
    "/abort_request",
    "/pause_generation",
    "/continue_generation",
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/release_memory_occupation",
    "/resume_memory_occupation",
)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": {"message": message}, **extra}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read() if request.can_read_body else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"the body is not valid JSON ({e}); send a JSON object.") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object.")
    return body


class Router:
    """The HTTP handlers around one `WorkerPool`."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    async def generate(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not body:
            raise UsageError("send a JSON object with input_ids (or text) and sampling_params.")
        return web.json_response(await self.pool.generate(body))

    async def health(self, request: web.Request) -> web.Response:
        healthy = self.pool.healthy
        if not healthy:
            return _error(503, "no healthy engine worker; start one or add it with /add_worker.")
        return web.json_response({"status": "ok", "healthy_workers": len(healthy)})

    async def health_generate(self, request: web.Request) -> web.Response:
        return web.json_response(await self.pool.request("GET", "/health_generate"))

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self.pool.request("GET", "/get_model_info"))

    async def server_info(self, request: web.Request) -> web.Response:
        info = await self.pool.request("GET", "/get_server_info")
        return web.json_response({**info, "workers": self.pool.workers(), "retries": self.pool.retries})

    async def list_workers(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"urls": self.pool.urls, "workers": self.pool.workers(), "retries": self.pool.retries}
        )

    async def _url(self, request: web.Request) -> str:
        url = request.query.get("url") or (await _json_body(request)).get("url")
        if not url:
            raise UsageError(
                'send the worker address as ?url=http://host:port or {"url": "http://host:port"}.'
            )
        return url

    async def add_worker(self, request: web.Request) -> web.Response:
        url = self.pool.add(await self._url(request))
        return web.json_response({"success": True, "message": f"added {url}", "urls": self.pool.urls})

    async def remove_worker(self, request: web.Request) -> web.Response:
        url = self.pool.remove(await self._url(request))
        return web.json_response({"success": True, "message": f"removed {url}", "urls": self.pool.urls})

    async def broadcast(self, request: web.Request) -> web.Response:
        """A control request to every healthy worker; 200 if all answered 2xx, else the first worker's
        4xx (or 502) with each failure named."""
        path = request.path  # the body goes on as it came (weights can be large); each worker checks it
        raw = await request.read() if request.can_read_body else b""
        results = await self.pool.broadcast(path, raw if raw.strip() else b"{}")
        if not results:
            return _error(
                503, f"no healthy engine worker to send {path} to; start one or add it with /add_worker."
            )
        bad = [r for r in results if r["status"] != 200]
        if not bad:
            n = len(results)
            return web.json_response(
                {"success": True, "message": f"{path} done on {n} workers", "workers": results}
            )
        status = next((r["status"] for r in bad if 400 <= r["status"] < 500), 502)
        why = "; ".join(f"{r['url']}: {str(r['message']).rstrip('.')}" for r in bad)
        return _error(status, f"{len(bad)} of {len(results)} workers failed {path} ({why}).", workers=results)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except UsageError as e:
        return _error(400, str(e))
    except WorkerError as e:
        return _error(e.status, e.message)
    except web.HTTPException:
        raise
    except Exception as e:  # a bug: answer, log, keep serving
        log.exception("router request %s failed", request.path)
        return _error(500, f"{type(e).__name__}: {e}")


def build_app(pool: WorkerPool) -> web.Application:
    """The router's aiohttp app; closing the app closes the pool's session."""
    app = web.Application(middlewares=[_errors], client_max_size=1 << 34)
    r = Router(pool)
    routes = [
        web.post("/generate", r.generate),
        web.get("/health", r.health),
        web.get("/health_generate", r.health_generate),
        web.get("/get_model_info", r.model_info),
        web.get("/get_server_info", r.server_info),
        web.get("/list_workers", r.list_workers),
        web.post("/add_worker", r.add_worker),
        web.post("/remove_worker", r.remove_worker),
        web.get("/flush_cache", r.broadcast),
    ]
    app.add_routes(routes + [web.post(path, r.broadcast) for path in BROADCAST])

    async def close_pool(app: web.Application) -> None:
        await pool.close()

    app.on_cleanup.append(close_pool)
    return app


async def serve(
    app: web.Application, host: str, port: int, stop: asyncio.Event, on_ready: Callable[[int], None]
) -> None:
    """Serve ``app`` until ``stop`` is set; ``on_ready(port)`` once it accepts connections."""
    # handler_cancellation: a client that hangs up cancels its proxied request, which the worker then aborts
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            raise UsageError(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0: any free)."
            ) from None
        on_ready(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


class RouterThread:
    """The router app on a background thread with its own loop: ``url = RouterThread(urls).start()``,
    then ``.stop()`` (or use it as a context manager). ``pool_kwargs`` go to `WorkerPool`."""

    def __init__(
        self,
        urls: list[str] | tuple[str, ...] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        **pool_kwargs: Any,
    ):
        self.pool = WorkerPool(urls, **pool_kwargs)
        self.host, self.port = host, port
        self.url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns the router's url once it accepts connections."""
        self._thread = threading.Thread(target=self._run, name="miles-router", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the router did not start within {timeout:g} s.")
        if self._error is not None:
            raise self._error
        assert self.url is not None
        return self.url

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()

        def ready(port: int) -> None:
            self.port, self.url = port, f"http://{_client_host(self.host)}:{port}"
            self._ready.set()

        await serve(build_app(self.pool), self.host, self.port, self._stop, ready)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the pool; waits for the thread (at most ``timeout`` seconds)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> RouterThread:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def parse_router_args(argv: list[str]) -> Any:
    parser = ArgumentParser(
        prog="miles router",
        formatter_class=HelpFormatter,
        description="Balance /generate over engine servers (miles serve, SGLang); health checks, retries.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)."
    )
    parser.add_argument("--port", type=int, default=30000, help="Port to bind (0: any free port).")
    parser.add_argument("--port-file", default=None, help="Write the bound port to this file once serving.")
    parser.add_argument("--worker-urls", nargs="*", default=[], help="Engine servers, http://host:port each.")
    parser.add_argument(
        "--health-check-interval", type=float, default=5.0, help="Seconds between /health checks."
    )
    parser.add_argument(
        "--health-check-timeout", type=float, default=2.0, help="Seconds a /health answer may take."
    )
    parser.add_argument(
        "--health-failure-threshold",
        type=int,
        default=3,
        help="Failed checks in a row that mark a worker unhealthy.",
    )
    parser.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="Re-sends of a failed request (default: the number of workers).",
    )
    args = parser.parse_args(argv)
    for flag in ("health_check_interval", "health_check_timeout"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.health_failure_threshold < 1:
        raise UsageError(
            f"--health-failure-threshold must be at least 1, got {args.health_failure_threshold}."
        )
    if args.max_retries is not None and args.max_retries < 0:
        raise UsageError(f"--max-retries must be 0 or more, got {args.max_retries}.")
    return args


def main(argv: list[str] | None = None) -> int:
    """`miles router`: serve until SIGTERM or SIGINT."""
    args = parse_router_args(list(sys.argv[1:] if argv is None else argv))
    pool = WorkerPool(
        args.worker_urls,
        health_check_interval=args.health_check_interval,
        health_check_timeout=args.health_check_timeout,
        failure_threshold=args.health_failure_threshold,
        max_retries=args.max_retries,
    )

    def ready(port: int) -> None:
        if args.port_file:
            atomic_write_text(args.port_file, str(port))
        log.info("router on http://%s:%d over %d workers", _client_host(args.host), port, len(pool.urls))

    async def run() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await serve(build_app(pool), args.host, args.port, stop, ready)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"miles router: error: {e}", file=sys.stderr)
        sys.exit(2)
