"""Training throughput of FSDP2 trainer ranks as they grow: tokens/s and MFU per GPU of N data-parallel
ranks of the built-in trainer (`miles_core.distributed.trainer.ShardedTrainer`, the ranks of `miles
train --use-ray`), each N of ``--ranks`` timed in the same call, and each against the smallest N.

The model is bench/rollout.py's preset with random weights (``qwen3-30b-a3b``, the default: Qwen3-30B-
A3B's layer shape with ``--layers`` of its 48 layers, 2 by default as in bench/train_step.py's runs: the
1-rank run holds every layer's fp32 weights, gradients and AdamW state, ~10 GB a layer, on one card).
Every rank gets the step's whole batch and trains on its share (balanced by tokens), as `miles train`
ranks do; the step takes ``--samples`` per rank (weak scaling: each rank trains as many tokens at every
N; bench/train_step.py's shape, 256 samples of 383 tokens = 98,048 tokens a rank on the qwen3-30b-a3b
preset), packed in micro-batches of ``--max-tokens`` a rank, with --bf16 on CUDA (bf16 compute, fp32
sharded masters). The ranks are processes of this machine (torch.multiprocessing, rank r on GPU r): NCCL
on CUDA, gloo on CPU (one thread a rank, so N ranks need N free cores to scale). FLOPs are
bench/train_step.py's `step_flops`; ``mfu`` is per GPU: the step's FLOPs / step time / N / the card's
dense bf16 peak (989 TFLOP/s for H100/H200; elsewhere a matmul measured by this process, on CPU on one
thread). ``efficiency`` = tok_s(N) / (N / N0 * tok_s(N0)), N0 the smallest N of ``--ranks`` (leave 1 out
to train more layers than one card holds).
Prints one JSON line.

    python bench/train_scale.py --ranks 1,2,4,8               # qwen3-30b-a3b, 2 layers
    python bench/train_scale.py --ranks 4,8 --layers 8        # against 4 ranks: 8 layers
    python bench/train_scale.py --preset cpu-small --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rollout import PRESETS, make_model
from train_step import SHAPES, SPEC_PEAK, matmul_peak, step_flops, time_steps

from miles_core.args import parse_args
from miles_core.distributed.trainer import ShardedTrainer, close_rank, init_rank
from miles_core.plugins import get_plugin_manager

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def efficiency(rows: list[dict], key: str = "tok_s") -> dict[str, float]:
    """``key``(N) / (N / N0 * ``key``(N0)) of each row, N0 the smallest ``ranks``."""
    base = min(rows, key=lambda r: r["ranks"])
    return {str(r["ranks"]): round(r[key] / (r["ranks"] / base["ranks"] * base[key]), 4) for r in rows}


def _rank_main(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One rank: join the group, build and shard the policy, time ``cfg['steps']`` steps; rank 0 writes
    the slowest rank's seconds per step (and its own peak memory) to ``out``."""
    preset, shape = cfg["preset"], cfg["shape"]
    torch.set_num_threads(1)  # a CPU rank stands for one device: one core each, at every N
    device = init_rank(rank, world, LOOPBACK, port, "cuda" if preset["device"] == "cuda" else "cpu")
    try:
        n = shape["samples"] * world  # the step's batch; each rank trains on its share
        model = make_model({**preset, "dtype": torch.float32}).requires_grad_(True)  # fp32 masters
        flags = ["--lr", "1e-6", "--global-batch-size", str(n), "--rollout-batch-size", str(n // 8 or 1)]
        flags += ["--n-samples-per-prompt", "8", "--num-rollout", "1"] + ["--bf16"] * (device.type == "cuda")
        flags += ["--recompute-granularity", cfg["recompute"]] if cfg["recompute"] else []
        flops = step_flops(model, n, shape["prompt"], shape["response"])  # before sharding
        packing = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(shape["max_tokens"])]
        pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
        trainer = ShardedTrainer(parse_args(flags + packing, pm), pm, model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dt, _ = time_steps(trainer, n, shape, cfg["steps"], device.type, warmups=1)
        slowest = torch.tensor(dt, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            mem = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
            result = {"step_s": float(slowest), "flops": flops, "max_mem_gb": mem}
            Path(out).write_text(json.dumps(result))
    finally:
        close_rank()


def time_world(world: int, cfg: dict) -> dict:
    """Spawn ``world`` ranks for one timing; returns rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "result.json"))
        mp.spawn(_rank_main, args=(world, free_port(), cfg, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2", help="Comma-separated rank counts N (default 1,2).")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (qwen3-30b-a3b: 2 by default).")
    ap.add_argument("--steps", type=int, default=3, help="Timed steps per N (after one warm-up step).")
    ap.add_argument("--samples", type=int, default=None, help="Samples per rank (default: the preset's).")
    ap.add_argument("--max-tokens", type=int, default=None, help="--max-tokens-per-gpu (default: preset's).")
    ap.add_argument(
        "--recompute", choices=["full", "selective"], default=None, help="--recompute-granularity."
    )
    a = ap.parse_args(argv)
    cuda = PRESETS[a.preset]["device"] == "cuda"
    a.ranks = device_counts(ap, a.ranks, "--ranks", cuda, ", or use --preset cpu-small")
    if min(a.ranks) < 1 or a.steps < 1 or (a.layers is not None and a.layers < 1):
        ap.error("--ranks takes counts >= 1, --steps and --layers at least 1.")
    return a


def device_counts(ap: argparse.ArgumentParser, text: str, flag: str, cuda: bool, hint: str = "") -> list[int]:
    """The distinct counts of ``flag``'s comma-separated ``text``, sorted; on CUDA, refused beyond the
    visible GPUs (one sentence naming them)."""
    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        ap.error(f"{flag} {text}: give comma-separated whole numbers, e.g. 1,2,4,8.")
    visible = torch.cuda.device_count() if cuda else None
    if visible is not None and max(counts) > visible:
        raise SystemExit(
            f"{flag} asks for {max(counts)} GPUs and this machine shows {visible} "
            f"(CUDA_VISIBLE_DEVICES); ask for at most {visible}{hint}."
        )
    return counts


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    preset, shape = dict(PRESETS[a.preset]), dict(SHAPES[a.preset])
    layers = a.layers or (2 if a.preset == "qwen3-30b-a3b" else preset["config"]["num_hidden_layers"])
    preset["config"] = {**preset["config"], "num_hidden_layers": layers}
    shape.update({k: v for k, v in (("samples", a.samples), ("max_tokens", a.max_tokens)) if v})
    cfg = {"preset": preset, "shape": shape, "steps": a.steps, "recompute": a.recompute}
    device = preset["device"]
    tokens_per_rank = shape["samples"] * (shape["prompt"] + shape["response"] - 1)
    rows = []
    for world in a.ranks:
        t0 = time.perf_counter()
        r = time_world(world, cfg)
        mem = r["max_mem_gb"]
        rows.append({"ranks": world, "step_s": round(r["step_s"], 4),
                     "tok_s": round(tokens_per_rank * world / r["step_s"], 1),
                     "tok_s_per_gpu": round(tokens_per_rank / r["step_s"], 1),
                     "flops": r["flops"], "max_mem_gb": None if mem is None else round(mem, 2)})  # fmt: skip
        print(json.dumps({**rows[-1], "wall_s": round(time.perf_counter() - t0, 1)}), file=sys.stderr)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # the peak of one CPU rank's thread
    measured = matmul_peak(device)
    peak = next((v for k, v in SPEC_PEAK.items() if k in name), None) or measured
    for row in rows:
        per_gpu = row.pop("flops") / row["step_s"] / row["ranks"]
        row.update(tflops_per_gpu=round(per_gpu / 1e12, 6), mfu=round(per_gpu / peak, 4))
    eff = efficiency(rows)
    for row in rows:
        row["efficiency"] = eff[str(row["ranks"])]
    result = {
        "device": name, "preset": a.preset, "layers": layers, "samples_per_rank": shape["samples"],
        "tokens_per_rank": tokens_per_rank, "max_tokens_per_gpu": shape["max_tokens"], "steps": a.steps,
        "peak_tflops": round(peak / 1e12, 6), "backend": "nccl" if device == "cuda" else "gloo",
        "ranks": rows, "efficiency": eff,
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
