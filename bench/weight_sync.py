"""Disaggregated weight sync against the machine's own collective bandwidth: the seconds a full
`HttpEngine.update_weights` (``--update-weights-mode distributed``, buckets of
``--update-weight-buffer-size``) takes from the trainer's device into N `miles serve` engines, the bytes
it moves, and the bus bandwidth of an all-reduce of ~1 GiB between the same devices. Prints one JSON line.

On CUDA the trainer's weights sit on GPU 0 and engine i runs on GPU i+1, so the weights go over NCCL
(the backend the updater picks; reported as ``backend``); on CPU, one process each, over Gloo.

    python bench/weight_sync.py                                   # gpu-0.7b, every other GPU an engine
    python bench/weight_sync.py --preset qwen3-30b-a3b --layers 24 --engines 1
    python bench/weight_sync.py --preset cpu-small                # CPU, Gloo

``sync_gbs`` is bytes / seconds of a full sync (what each engine receives per second: a broadcast's bus
bandwidth equals its algorithm bandwidth); ``allreduce_busbw_gbs`` is 2(n-1)/n x bytes / seconds of one
all-reduce over the n = engines + 1 devices (nccl-tests' bus bandwidth); ``ratio`` is their quotient.
``host_copy_gbs`` is the trainer GPU's copy rate into pinned host memory: each sync also fills the host
copy that catches up a restarted engine, behind the broadcasts; ``host_copy_lag_s`` is how much longer
that copy took to finish after the sync returned (the next sync waits for it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import PRESETS, make_model  # noqa: E402

from miles_core.args import parse_args  # noqa: E402
from miles_core.model import named_hf_tensors, save_model  # noqa: E402
from miles_core.serve.client import HttpEngine  # noqa: E402
from miles_core.testing import Served, launch_server, stop_server, wait_server  # noqa: E402


def _gbs(x: float) -> float:
    return float(f"{x:.4g}")


@contextlib.contextmanager
def _visible(device: str | None) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` for the processes started inside (this one's CUDA is already set up)."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_rank(rank: int, world: int, port: int, nbytes: int, iters: int, cuda: bool, out) -> None:
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        x = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        for _ in range(3):  # warm-up: the communicator and its buffers
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / iters
        if rank == 0:
            out.put(seconds)
    finally:
        dist.destroy_process_group()


def allreduce_busbw(world: int, nbytes: int, iters: int, cuda: bool) -> tuple[float, float]:
    """(seconds, bus GB/s) of one all-reduce of ``nbytes`` over ``world`` processes, one a device."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_allreduce_rank, args=(r, world, port, nbytes, iters, cuda, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"an all-reduce process failed (exit codes {[p.exitcode for p in procs]}).")
    seconds = out.get(timeout=10)
    return seconds, bus_gbs(world, nbytes, seconds)


def bus_gbs(world: int, nbytes: int, seconds: float) -> float:
    """An all-reduce's bus bandwidth (nccl-tests): 2(n-1)/n x bytes / seconds, in GB/s."""
    return 2 * (world - 1) / world * nbytes / seconds / 1e9


def host_copy_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one copy of ``nbytes`` from ``device`` into pinned host memory."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-0.7b")
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the preset's).")
    ap.add_argument(
        "--engines", type=int, default=None,
        help="Engines, one a GPU (default: every GPU but the trainer's; 1 on CPU).",
    )  # fmt: skip
    ap.add_argument("--updates", type=int, default=3, help="Timed syncs (after one that builds the group).")
    ap.add_argument("--update-weight-buffer-size", type=int, default=512 << 20, help="Bytes a bucket.")
    ap.add_argument("--allreduce-mib", type=int, default=None, help="All-reduce size (default 1024; CPU 64).")
    ap.add_argument("--allreduce-iters", type=int, default=20)
    a = ap.parse_args(argv)
    # NVLink multicast stays off unless the caller's environment says otherwise (never turned on here);
    # the engines and the all-reduce processes inherit it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    preset = dict(PRESETS[a.preset])
    if a.layers is not None:
        preset["config"] = {**preset["config"], "num_hidden_layers": a.layers}
    cuda = preset["device"] == "cuda"
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit("weight_sync.py on CUDA needs 2 GPUs or more (trainer on GPU 0, engines after it).")
    engines = a.engines or (torch.cuda.device_count() - 1 if cuda else 1)
    gpus = torch.cuda.device_count()
    if cuda and engines + 1 > gpus:
        raise SystemExit(f"--engines {engines} needs {engines + 1} GPUs; this machine has {gpus}.")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
    trainer_device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    mib = a.allreduce_mib or (1024 if cuda else 64)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "preset": a.preset,
        "layers": preset["config"]["num_hidden_layers"],
        "engines": engines,
        "bucket_mb": round(a.update_weight_buffer_size / 2**20, 1),
        "nccl_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")},
    }
    # Before the engines take their GPUs' memory: the same devices' collective bandwidth.
    ar_s, busbw = allreduce_busbw(engines + 1, mib << 20, a.allreduce_iters, cuda)
    result.update(allreduce_mib=mib, allreduce_s=round(ar_s, 6), allreduce_busbw_gbs=_gbs(busbw))
    if cuda:
        result["host_copy_gbs"] = _gbs(host_copy_gbs(trainer_device))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model({**preset, "device": str(trainer_device)})  # the trainer's weights
        save_model(model, tmp + "/ckpt")  # the engines start from the same shapes
        named = list(named_hf_tensors(model))
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        dtype = str(preset["dtype"]).removeprefix("torch.")
        launched = []
        for i in range(engines):  # engine i sees one GPU: the one i+1 places after the trainer's
            with _visible(gpu_ids[i + 1] if cuda else None):
                launched.append(
                    launch_server(Path(tmp, "ckpt"), Path(tmp, f"engine-{i}"), "--rollout-dtype", dtype,
                                  "--no-rollout-cuda-graph", "--device", "cuda" if cuda else "cpu")
                )  # fmt: skip
        try:
            urls = [wait_server(proc, port_file, 1200).url for proc, port_file in launched]
            flags = ["--hf-checkpoint", tmp + "/ckpt", "--prompt-data", "x", "--rollout-batch-size", "8"]
            flags += ["--num-rollout", "1", "--device", str(trainer_device), "--run-dir", tmp + "/run"]
            flags += ["--update-weights-mode", "distributed", "--rollout-engine-urls", *urls]
            flags += ["--update-weight-buffer-size", str(a.update_weight_buffer_size)]
            with HttpEngine.from_args(parse_args(flags), None, None) as client:
                seconds, lags = [], []
                for version in range(1, a.updates + 2):
                    t0 = time.perf_counter()
                    client.update_weights(named, version)
                    seconds.append(time.perf_counter() - t0)
                    client.updater.wait_kept()  # the host copy for restarts, finishing behind the sync
                    lags.append(time.perf_counter() - t0 - seconds[-1])
                result["backend"] = client.updater.backend
        finally:
            for proc, port_file in launched:
                stop_server(Served(proc, "", port_file.with_suffix(".log")))
    sync_s = statistics.median(seconds[1:])
    result.update(
        bytes=nbytes,
        first_sync_s=round(seconds[0], 4),
        sync_s=round(sync_s, 4),
        host_copy_lag_s=round(statistics.median(lags[1:]), 4),
        sync_gbs=_gbs(nbytes / sync_s / 1e9),
        ratio=_gbs(nbytes / sync_s / 1e9 / busbw),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
