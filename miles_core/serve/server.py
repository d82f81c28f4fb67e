"""`miles serve`: the built-in engine behind the subset of SGLang's HTTP API that miles and slime use.

Every handler runs on the engine's own asyncio loop, so concurrent ``/generate`` requests join one
continuous batch, and control requests (abort, pause, weight updates, memory release) run between two
decode steps. The server runs the plugins itself: ``configure``, ``configure_model(role="rollout")`` at
start and ``pre_rollout`` (rollout id = weight version) at start and after every weight update, so FP8 and
INT4 rollouts, speculative decoding and route capture work as they do in-process. A malformed request gets
HTTP 400 with one sentence (``{"error": {"message": ...}}``) and the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from miles_core import __version__
from miles_core.atomic import atomic_write_text
from miles_core.engine import Engine
from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.model.hf_io import iter_safetensors, named_hf_tensors, weight_files
from miles_core.serve import ipc, weight_sync
from miles_core.serve.protocol import (
    BadRequest,
    decode_tensors,
    generate_response,
    parse_generate,
    score_response,
)

log = get_logger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _ok(message: str = "", **extra: Any) -> web.Response:
    return web.json_response({"success": True, "message": message, **extra})


class Server:
    """The HTTP face of one `Engine` (and the plugins that prepare its rollouts)."""

    def __init__(self, args: argparse.Namespace, pm: Any, engine: Engine, tokenizer: Any) -> None:
        self.args, self.pm, self.engine, self.tokenizer = args, pm, engine, tokenizer
        self.model_path = str(args.hf_checkpoint)
        cfg = engine.model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.routes_asked = False
        self.groups: dict[str, weight_sync.WeightGroup] = {}
        self.gpu_uuid = weight_sync.gpu_uuid(torch.device(engine.device))  # the trainer picks NCCL by it

    # ---------------------------------------------------------------- helpers

    def prepare_rollout(self) -> None:
        """The plugins' ``pre_rollout`` for the weights now loaded (rollout id = weight version)."""
        if self.pm is None:
            return
        from miles_core.rollout.manager import rollout_options

        opts = rollout_options(self.pm, self.args, self.engine.weight_version, self.engine)
        self.engine.set_rollout_options(opts)
        self.engine.capture_routes = opts.capture_routes or self.routes_asked

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e}); send a JSON object.") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object.")
        return body

    def _version(self, body: dict[str, Any]) -> int:
        v = body.get("weight_version")
        if v is None:
            return self.engine.weight_version + 1
        try:
            return int(v)
        except (TypeError, ValueError):
            raise BadRequest(
                f"weight_version {v!r} is not an integer; miles numbers versions 0, 1, 2, ..."
            ) from None

    def _loaded(self, named: Any, body: dict[str, Any]) -> web.Response:
        version = self._version(body)
        try:
            self.engine.update_weights(named, version)
        except UsageError as e:
            raise BadRequest(str(e)) from None
        if body.get("flush_cache"):
            self.engine.flush_cache()
        self.prepare_rollout()
        return _ok(f"weights loaded as version {version}", weight_version=str(version))

    # ---------------------------------------------------------------- endpoints

    async def generate(self, request: web.Request) -> web.Response:
        req = parse_generate(await self._body(request), self.tokenizer, self.vocab_size)
        if req.logprob_start_len is not None:  # max_new_tokens 0: score the prompt (an OPD teacher)
            if self.max_len is not None and len(req.input_ids) > self.max_len:
                raise BadRequest(f"{len(req.input_ids)} tokens exceed the model's {self.max_len} positions.")
            temperature = float(req.sampling_params.get("temperature", 1.0))
            lps = self.engine.score(req.input_ids, temperature)
            return web.json_response(score_response(req, lps, self.engine.weight_version))
        budget = int(req.sampling_params.get("max_new_tokens", 128))
        if self.max_len is not None and len(req.input_ids) + budget > self.max_len:
            raise BadRequest(
                f"{len(req.input_ids)} prompt tokens + max_new_tokens {budget} exceed the model's "
                f"{self.max_len} positions; shorten the prompt or lower max_new_tokens."
            )
        if req.return_routed_experts and not self.engine.capture_routes:
            self.routes_asked = self.engine.capture_routes = True
        req.rid = req.rid or uuid.uuid4().hex
        task = asyncio.ensure_future(self.engine.generate(req.input_ids, req.sampling_params, rid=req.rid))
        try:
            out = await asyncio.shield(task)
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            self.engine.abort(req.rid)
            raise
        return web.json_response(generate_response(req, out, self.tokenizer))

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def health_generate(self, request: web.Request) -> web.Response:
        if self.engine.paused:
            return _error(503, "generation is paused or the memory released; POST /continue_generation "
                          "or /resume_memory_occupation.")  # fmt: skip
        out = await self.engine.generate([0], {"max_new_tokens": 1, "temperature": 0.0}, rid="health")
        return (
            web.Response(text="") if len(out.output_ids) == 1 else _error(503, "the engine produced nothing.")
        )

    async def model_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.model.config
        return web.json_response(
            {
                "model_path": self.model_path,
                "tokenizer_path": self.model_path,
                "is_generation": True,
                "weight_version": str(self.engine.weight_version),
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_experts": getattr(cfg, "num_experts", 0) or 0,
                "num_experts_per_tok": getattr(cfg, "num_experts_per_tok", 0) or 0,
                "vocab_size": self.vocab_size,
            }
        )

    async def server_info(self, request: web.Request) -> web.Response:
        e = self.engine
        return web.json_response(
            {
                "version": __version__,
                "engine": "miles",
                "model_path": self.model_path,
                "weight_version": str(e.weight_version),
                "num_running": e.num_running,
                "num_waiting": e.num_waiting,
                "generated_tokens": e.generated_tokens,
                "decode_steps": e.stats["decode_steps"],
                "prefills": e.stats["prefills"],
                "prefill_tokens": e.stats["prefill_tokens"],
                "busy_s": round(e.stats["busy_s"], 4),
                "cuda_graph": e.cuda_graph,
                "paused": e.paused,
                "memory_released": e.memory_released,
                "max_batch_size": e.max_batch_size,
                "device": str(e.device),
                "gpu_uuid": self.gpu_uuid,
                "packed_broadcast": True,  # /update_weights_from_distributed takes "packed": true
                "dtype": str(e.dtype).removeprefix("torch."),
            }
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        if not self.engine.flush_cache():
            return _error(400, "requests are running; flush the cache when the engine is idle.")
        return _ok("cache flushed")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        rid = body.get("rid")
        if not body.get("abort_all") and not isinstance(rid, str):
            raise BadRequest('send {"rid": "<request id>"} or {"abort_all": true}.')
        n = self.engine.abort(None if body.get("abort_all") else rid)
        return _ok(f"aborted {n} requests", num_aborted=n)

    async def pause(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "in_place"):
            raise BadRequest(f"mode {mode!r} is not one of abort, in_place.")
        n = self.engine.pause_generation(mode)
        return _ok(f"paused ({mode})", num_aborted=n)

    async def resume_generation(self, request: web.Request) -> web.Response:
        self.engine.continue_generation()
        return _ok("generation continues")

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not all(isinstance(b, str) for b in blobs):
            raise BadRequest("serialized_named_tensors must be a list of base64 safetensors blobs.")
        named = [pair for b in blobs for pair in self._tensors(b, request.remote)]
        return self._loaded(named, body)

    @staticmethod
    def _tensors(blob: str, peer: str | None) -> list[tuple[str, torch.Tensor]]:
        """One blob of safetensors, or (from this machine only) SGLang's pickle of tensors handed over in
        place (`miles_core.serve.ipc`)."""
        try:
            raw = base64.b64decode(blob[:8], validate=True)
        except binascii.Error:
            raw = b""
        if not ipc.is_pickle(raw):
            return decode_tensors(blob)
        if not ipc.is_local_peer(peer):
            raise BadRequest(
                f"a pickled tensor blob is accepted only from this machine, not from {peer}; send "
                "safetensors (miles_core.serve.protocol.encode_tensors) instead."
            )
        try:
            return ipc.load_shared(base64.b64decode(blob, validate=True))
        except Exception as err:  # a bad pickle raises anything
            raise BadRequest(f"serialized_named_tensors holds a pickle that does not load ({err}).") from err

    async def update_from_disk(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not Path(path, "config.json").is_file():
            raise BadRequest(
                f"model_path {path!r} is not an HF checkpoint folder (no config.json); fix the path."
            )
        try:
            named = list(iter_safetensors(weight_files(Path(path))))
        except UsageError as e:
            raise BadRequest(str(e)) from None
        response = self._loaded(named, body)
        self.model_path = path
        return response

    async def init_group(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        need = ("master_address", "master_port", "rank_offset", "world_size", "group_name")
        missing = [k for k in need if k not in body]
        if missing:
            raise BadRequest(f"init_weights_update_group needs {', '.join(missing)}.")
        backend = body.get("backend", "gloo")
        if backend not in ("gloo", "nccl") or (backend == "nccl" and self.engine.device.type != "cuda"):
            raise BadRequest(
                f"backend {backend!r} is not usable here; use gloo (CPU) or nccl (CUDA engines)."
            )
        group = await asyncio.to_thread(
            weight_sync.join_group,
            str(body["master_address"]),
            int(body["master_port"]),
            int(body["rank_offset"]),
            int(body["world_size"]),
            str(body["group_name"]),
            backend,
            device=self.engine.device if backend == "nccl" else None,
        )
        self.groups[group.name] = group
        return _ok(f"joined weight update group {group.name} as rank {group.rank}")

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        group = self.groups.get(body.get("group_name", ""))
        if group is None:
            raise BadRequest(
                f"no weight update group {body.get('group_name')!r}; POST /init_weights_update_group first."
            )
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)) or not (
            len(names) == len(dtypes) == len(shapes)
        ):
            raise BadRequest("names, dtypes and shapes must be lists of the same length.")
        bad = [d for d in dtypes if d not in weight_sync.DTYPES]
        if bad:
            raise BadRequest(f"dtype {bad[0]!r} is not one of {', '.join(weight_sync.DTYPES)}.")
        packed = bool(body.get("packed", False))
        tensors = await asyncio.to_thread(weight_sync.receive, group, dtypes, shapes, packed)
        return self._loaded(list(zip(names, tensors)), body)

    async def destroy_group(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.groups.pop(str(body.get("group_name", "")), None) is None:
            raise BadRequest(f"no weight update group {body.get('group_name')!r}.")
        return _ok("group destroyed")

    async def weights_by_name(self, request: web.Request) -> web.Response:
        """SGLang's check that an update landed: the first ``truncate_size`` rows of weight ``name``."""
        body = await self._body(request)
        name, rows = body.get("name"), body.get("truncate_size", 100)
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise BadRequest(f"truncate_size {rows!r} must be a positive integer.")
        t = next((t for n, t in named_hf_tensors(self.engine.model) if n == name), None)
        if t is None:
            raise BadRequest(f"no weight named {name!r}; use its HF name, e.g. model.norm.weight.")
        t = t if t.dim() else t.reshape(1)
        return web.json_response(t[:rows].float().tolist())  # bf16/fp16/fp32 values are exact in JSON

    async def release_memory(self, request: web.Request) -> web.Response:
        try:
            self.engine.release_memory_occupation()
        except UsageError as e:
            raise BadRequest(str(e)) from None
        return _ok("memory released")

    async def resume_memory(self, request: web.Request) -> web.Response:
        self.engine.resume_memory_occupation()
        return _ok("memory resumed")


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as e:
        return _error(400, str(e))
    except web.HTTPException:
        raise
    except Exception as e:  # a bug or a dead device: answer, log, keep serving
        log.exception("request %s failed", request.path)
        return _error(500, f"{type(e).__name__}: {e}")


def build_app(server: Server) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1 << 34)
    s = server
    app.add_routes(
        [
            web.post("/generate", s.generate),
            web.get("/health", s.health),
            web.get("/health_generate", s.health_generate),
            web.get("/get_model_info", s.model_info),
            web.get("/get_server_info", s.server_info),
            web.get("/flush_cache", s.flush_cache),
            web.post("/flush_cache", s.flush_cache),
            web.post("/abort_request", s.abort_request),
            web.post("/pause_generation", s.pause),
            web.post("/continue_generation", s.resume_generation),
            web.post("/update_weights_from_tensor", s.update_from_tensor),
            web.post("/update_weights_from_disk", s.update_from_disk),
            web.post("/init_weights_update_group", s.init_group),
            web.post("/update_weights_from_distributed", s.update_from_distributed),
            web.post("/destroy_weights_update_group", s.destroy_group),
            web.post("/get_weights_by_name", s.weights_by_name),
            web.post("/release_memory_occupation", s.release_memory),
            web.post("/resume_memory_occupation", s.resume_memory),
        ]
    )
    return app


async def run_app(app: web.Application, host: str, port: int, port_file: str | None = None) -> None:
    """Serve ``app`` until SIGTERM/SIGINT; writes the bound port to ``port_file`` once accepting."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    if port_file:
        atomic_write_text(port_file, str(bound))
    log.info("serving on http://%s:%d", host, bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("serve")
    g.add_argument(
        "--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only)."
    )
    g.add_argument("--port", type=int, default=30000, help="Port to bind (0: any free port).")
    g.add_argument("--port-file", default=None, help="Write the bound port to this file once serving.")
    g.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="Longest prompt + response served (tokens). Set, the KV cache is sized for it and the decode "
        "step captured for every batch size before the first request (default: sized by the first "
        "requests, captured as batch sizes appear).",
    )


def build_server(args: argparse.Namespace, pm: Any) -> Server:
    """Load the model named by ``--hf-checkpoint`` with the rollout flags and plugins; wrap it."""
    from miles_core.data import Tokenizer
    from miles_core.loop import pick_device, rollout_dtype
    from miles_core.model import load_model

    if not args.hf_checkpoint or not Path(args.hf_checkpoint, "config.json").is_file():
        raise UsageError(
            f"--hf-checkpoint {args.hf_checkpoint} is not an HF checkpoint folder; point it at one."
        )
    device = pick_device(args)
    dtype = rollout_dtype(args, device)
    model = load_model(args.hf_checkpoint, dtype=DTYPES[dtype], device=device).requires_grad_(False)
    if pm is not None:
        pm.hook.configure_model(args=args, model=model, role="rollout")
    tokenizer = None
    if Path(args.hf_checkpoint, "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_pretrained(args.hf_checkpoint)
    else:  # token ids in, token ids out (stop strings and "text" requests need a tokenizer)
        log.warning("%s has no tokenizer.json: requests must send input_ids", args.hf_checkpoint)
    if args.rollout_max_batch_size is None and args.rollout_batch_size is None:
        args.rollout_max_batch_size = 128
    engine = Engine.from_args(args, model, tokenizer)
    if args.context_length:
        limit = getattr(model.config, "max_position_embeddings", None) or args.context_length
        if args.context_length > limit:
            raise UsageError(
                f"--context-length {args.context_length} exceeds the model's {limit} positions; lower it."
            )
        log.info("warmed up %d decode steps", engine.warm_up(args.context_length))
    server = Server(args, pm, engine, tokenizer)
    if args.context_length:
        server.max_len = args.context_length
    server.prepare_rollout()
    return server


def serve_main(argv: list[str]) -> int:
    from miles_core.args import parse_args
    from miles_core.plugins import configure_plugins, disabled_from_argv, get_plugin_manager

    pm = get_plugin_manager(disable=disabled_from_argv(argv))
    args = parse_args(argv, pm, extra=add_serve_arguments, prog="miles serve")
    configure_plugins(pm, args)
    server = build_server(args, pm)
    asyncio.run(run_app(build_app(server), args.host, args.port, args.port_file))
    return 0
