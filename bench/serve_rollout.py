"""Served vs in-process rollout: 64 concurrent HTTP clients against one `miles serve`, and the same
engine in this process, on the same checkpoint, prompts and sampling settings (temperature 1, no EOS, so
every request runs its full length). Both use the engine's `miles train` defaults (`Engine.from_args`:
CUDA graphs on CUDA; `--compile` adds `--rollout-compile` to both). Prints one JSON line.

    python bench/rollout.py --server              # gpu-0.7b, 64 clients x 256 new tokens
    python bench/serve_rollout.py --preset cpu-small
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import PRESETS, make_model, sync  # noqa: E402

from miles_core.args import build_parser  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.model import load_model, save_model  # noqa: E402

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def engine_flags(batch: int, dtype: torch.dtype, compile: bool) -> list[str]:
    flags = ["--rollout-max-batch-size", str(batch), "--rollout-dtype", DTYPE_NAMES[dtype]]
    return flags + (["--rollout-compile"] if compile else [])


def serve_flags(context: int) -> list[str]:
    """A server sized for the requests and warmed up (every batch-size step captured) before it serves."""
    return ["--context-length", str(context)]


def in_process(folder: str, prompts, params, device: str, flags: list[str], how: str = "engine") -> float:
    """``how``: ``engine`` (Engine.from_args), ``server`` (the engine `miles serve` builds, with the
    installed plugins, used without HTTP) or ``server-no-plugins``."""
    args = build_parser().parse_args(["--hf-checkpoint", folder, "--device", device, *flags])
    if how == "engine":
        model = load_model(folder, dtype=PRESET["dtype"], device=device).requires_grad_(False)
        engine = Engine.from_args(args, model, None)
    else:
        from miles_core.plugins import configure_plugins, get_plugin_manager
        from miles_core.serve.server import add_serve_arguments, build_server

        pm = get_plugin_manager() if how == "server" else None
        parser = build_parser(pm)
        add_serve_arguments(parser)  # --context-length, as `miles serve` has it
        args = parser.parse_args(["--hf-checkpoint", folder, "--device", device, *flags])
        if pm is not None:
            configure_plugins(pm, args)
        engine = build_server(args, pm).engine
    engine.generate_batch(prompts, params)  # warm-up: cache, graphs, compiles
    sync(device)
    steps, busy, prefills = engine.stats["decode_steps"], engine.stats["busy_s"], engine.stats["prefills"]
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params)
    sync(device)
    wall = time.perf_counter() - t0
    STEPS["in_process"] = engine.stats["decode_steps"] - steps
    STEPS["in_process_prefills"] = engine.stats["prefills"] - prefills
    STEPS["in_process_busy_frac"] = round((engine.stats["busy_s"] - busy) / wall, 3)
    return sum(len(o.output_ids) for o in outs) / wall


async def clients(url: str, prompts, params) -> tuple[int, float]:
    """A warm-up pass, then the timed pass, over one session (kept-alive connections, as a rollout
    client keeps them); returns the timed pass's tokens and wall time."""
    import aiohttp

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as s:

        async def one(p):
            t = time.perf_counter()
            async with s.post(url + "/generate", json={"input_ids": p, "sampling_params": params}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(body)
                LAT.append(time.perf_counter() - t)
                return body["meta_info"]["completion_tokens"]

        await asyncio.gather(*(one(p) for p in prompts))  # warm-up, as in-process
        LAT.clear()
        before = _info(url)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
        after = _info(url)
        STEPS["served"] = after["decode_steps"] - before["decode_steps"]
        STEPS["served_prefills"] = after["prefills"] - before["prefills"]
        STEPS["served_cuda_graph"] = after["cuda_graph"]
        STEPS["served_busy_frac"] = round((after["busy_s"] - before["busy_s"]) / wall, 3)
        STEPS["latency_s"] = [round(min(LAT), 3), round(max(LAT), 3)]
        return sum(counts), wall


def served(folder: str, prompts, params, device: str, flags: list[str], workdir: Path) -> float:
    port_file = workdir / "port"
    log = (workdir / "serve.log").open("w")
    cmd = [sys.executable, "-m", "miles_core.cli", "serve", "--hf-checkpoint", folder, "--port", "0",
           "--port-file", str(port_file), "--device", device, *flags,
           *serve_flags(len(prompts[0]) + params["max_new_tokens"])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        for _ in range(6000):  # up to 10 minutes to load and bind
            if port_file.is_file() or proc.poll() is not None:
                break
            time.sleep(0.1)
        if not port_file.is_file():
            raise RuntimeError(f"miles serve did not start:\n{(workdir / 'serve.log').read_text()[-2000:]}")
        url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        tokens, wall = asyncio.run(clients(url, prompts, params))
        return tokens / wall
    finally:
        proc.terminate()
        proc.wait(30)


def _info(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/get_server_info", timeout=60) as r:
        return json.loads(r.read())


PRESET: dict = {}
STEPS: dict = {}
LAT: list = []


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-0.7b")
    ap.add_argument("--clients", type=int, default=64, help="Concurrent HTTP requests (= in-process batch).")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="--rollout-compile on both sides.")
    ap.add_argument("--served-first", action="store_true", help="Time the server before the in-process arm.")
    ap.add_argument(
        "--direct", nargs="*", default=[], choices=["server", "server-no-plugins"],
        help="Also time the engine `miles serve` builds, called in this process without HTTP.",
    )  # fmt: skip
    ap.add_argument("--also-eager", action="store_true", help="Also time the in-process engine eagerly.")
    a = ap.parse_args(argv)
    PRESET.update(PRESETS[a.preset])
    device = PRESET["device"]
    new = a.new_tokens or PRESET["new_tokens"]
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": new}
    flags = engine_flags(a.clients, PRESET["dtype"], a.compile)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(PRESET)
        vocab = model.config.vocab_size
        save_model(model, tmp + "/ckpt")
        del model
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(1, vocab, (a.clients, PRESET["prompt_len"]), generator=g).tolist()
        if a.served_first:  # no CUDA context in this process while the server runs
            remote = served(tmp + "/ckpt", prompts, params, device, flags, Path(tmp))
        local = in_process(tmp + "/ckpt", prompts, params, device, flags)
        eager = None
        if a.also_eager:
            eager = in_process(tmp + "/ckpt", prompts, params, device, flags + ["--no-rollout-cuda-graph"])
        direct = {}
        for how in a.direct:
            direct[f"direct_{how}_tok_s"] = round(
                in_process(tmp + "/ckpt", prompts, params, device, flags, how), 1
            )
        if device == "cuda":
            torch.cuda.empty_cache()
        if not a.served_first:
            remote = served(tmp + "/ckpt", prompts, params, device, flags, Path(tmp))
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": a.preset,
        "clients": a.clients,
        "new_tokens": new,
        "compile": a.compile,
        "in_process_tok_s": round(local, 1),
        "served_tok_s": round(remote, 1),
        "ratio": round(remote / local, 3),
        "decode_steps_in_process": STEPS["in_process"],
        "decode_steps_served": STEPS["served"],
        "prefills_in_process": STEPS["in_process_prefills"],
        "prefills_served": STEPS["served_prefills"],
        "served_cuda_graph": STEPS["served_cuda_graph"],
        "served_latency_s": STEPS["latency_s"],
        "served_busy_frac": STEPS["served_busy_frac"],
        "in_process_busy_frac": STEPS["in_process_busy_frac"],
        "served_first": a.served_first,
    }
    if eager is not None:
        result["in_process_eager_tok_s"] = round(eager, 1)
    result.update(direct)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
