"""Worlds of FSDP2 trainer ranks for the tests (real processes: gloo on CPU, NCCL on CUDA, one GPU a rank),
shared by `test_fsdp_trainer` (CPU) and `test_multigpu` (CUDA).

`spawn` starts ``size`` rank processes that each run a world's body, ``body(ctx, build)``; each rank's
result comes back as a ``torch.save`` file and the tests compare them. ``build(layout, resume=None)``
makes the rank's `ShardedTrainer` for one of `FLAGS`' flag sets, resumed from a checkpoint folder if
given. `steps_world` and `resumed_world` are the bodies that rank-count checks share: step 1 (and a
checkpoint after it, then step 2 uninterrupted), and step 2 resumed from another world's checkpoint.
"""

from __future__ import annotations

import random
import socket
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from miles_core.args import check_run_args, parse_args
from miles_core.loop import make_train_batch
from miles_core.plugins import get_plugin_manager
from miles_core.types import Sample, Status

# Both layouts give the ranks different micro-batch counts on batch 1's lengths (test_fsdp_trainer checks
# it); the packed one also recomputes each layer's MoE block in backward (--recompute-activations). The
# KL term (policy from tiny_ckpt_b, reference tiny_ckpt) exercises the sharded reference model. A larger
# AdamW eps keeps the updated weights a well-conditioned function of the gradient: with 1e-8, a first
# step moves each weight by ~lr * sign(grad), and an expert's near-zero gradient (a sum that cancels)
# flips sign with the summation order.
COMMON = ["--use-kl-loss", "--kl-loss-coef", "0.1", "--entropy-coef", "0.01", "--adam-eps", "1e-4"]
LR = 1e-3
ADAM_EPS = 1e-4
LAYOUTS = {
    "padded": ["--micro-batch-size", "2", "--calculate-per-token-loss"],
    "dynamic": ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "16", "--recompute-activations"],
}
# --bf16: bf16 compute (FSDP's MixedPrecisionPolicy), the fp32 shards are the masters.
FLAGS = {**LAYOUTS, "bf16": ["--micro-batch-size", "2", "--calculate-per-token-loss", "--bf16"]}
RESPONSES = {1: [30, 2, 3, 2, 4, 3, 2, 5], 2: [3, 9, 2, 6, 2, 11, 4, 3]}  # batch seed -> lengths
PROMPT_LEN = 4
REL = 1e-5


def make_args(ref_ckpt: Path, extra: list[str]):
    argv = [
        "--hf-checkpoint", str(ref_ckpt), "--prompt-data", "x.jsonl", "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4", "--num-rollout", "2", "--rm-type", "math", "--lr", str(LR), *extra,
    ]  # fmt: skip
    args = parse_args(argv, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}))
    check_run_args(args)
    return args


def make_batch(args, seed: int, record_routes: bool = False):
    """Two groups of four samples with the response lengths of ``RESPONSES[seed]``."""
    rng = random.Random(seed)
    samples = []
    for i, r in enumerate(RESPONSES[seed]):
        tokens = [rng.randrange(5, 200) for _ in range(PROMPT_LEN + r)]
        samples.append(
            Sample(
                group_index=i // 4,
                index=i,
                tokens=tokens,
                response_length=r,
                rollout_log_probs=[-4.0 - 0.1 * j for j in range(r)],
                loss_mask=[1] * r,
                reward=float((i + seed) % 2 + (i == 3)),
                status=Status.COMPLETED,
                sampling_params={"temperature": 0.9},
            )  # fmt: skip
        )
    batch = make_train_batch(samples, args)
    batch.record_routes = record_routes
    return batch


# -------------------------------------------------------------------------------- inside a rank


def weights(trainer, bucket_bytes: int = 64 * 2**10) -> tuple[list, list[tuple[int, int]]]:
    """The full weights on the CPU (names in order) and the (bytes, count) of each bucket."""
    buckets = list(trainer.full_weights(bucket_bytes))
    flat = [(n, t.to("cpu", copy=True)) for b in buckets for n, t in b]
    return flat, [(sum(t.numel() * t.element_size() for _, t in b), len(b)) for b in buckets]


def step(trainer, args, seed: int, record_routes: bool = False) -> dict:
    """One optimizer step on batch ``seed``: its metrics, the updated full weights, their buckets and the
    fused-experts form of them (all on the CPU)."""
    batch = make_batch(args, seed, record_routes)
    metrics = trainer.train(seed - 1, batch)[0]
    flat, bucket_sizes = weights(trainer)
    fused_buckets = trainer.full_weights(64 * 2**10, fused_experts=True)
    fused = [(n, t.to("cpu", copy=True)) for b in fused_buckets for n, t in b]
    out = {"metrics": metrics, "weights": flat, "buckets": bucket_sizes, "fused": fused}
    if record_routes:
        out["routes"] = [r.cpu() for r in batch.recorded_routes]
    return out


def checkpoint_dir(ctx: dict, world: str, layout: str) -> Path:
    return ctx["out"] / f"ckpt_{world}_{layout}"


def steps_world(ctx: dict, build) -> dict:
    """Step 1 (batch 1) in each layout of ``ctx["layouts"]``: ``{layout: step}``. For each layout of
    ``ctx["checkpointed"]``, also a checkpoint after step 1 (`checkpoint_dir` of this world), an offload
    and onload, then step 2 (batch 2) uninterrupted: ``{"step2": {layout: step}}``."""
    res: dict = {"step2": {}}
    for layout in ctx["layouts"]:
        trainer, args = build(layout)
        res[layout] = step(trainer, args, 1, record_routes=layout == "padded")
        if layout in ctx["checkpointed"]:
            ckpt = checkpoint_dir(ctx, ctx["world"], layout)
            trainer.save_model(ckpt / "model", str(ctx["ref"]))
            trainer.save_state(ckpt)
            trainer.offload()
            trainer.onload()
            res["step2"][layout] = step(trainer, args, 2)
    return res


def resumed_world(ctx: dict, build) -> dict:
    """Step 2 resumed from world ``ctx["resume"]``'s checkpoint of each layout of ``ctx["checkpointed"]``:
    ``{"resumed_step2": {layout: step}}``."""
    res = {}
    for layout in ctx["checkpointed"]:
        trainer, args = build(layout, checkpoint_dir(ctx, ctx["resume"], layout))
        res[layout] = step(trainer, args, 2)
    return {"resumed_step2": res}


def _rank_main(rank: int, body: Callable, size: int, port: int, ctx: dict) -> None:
    torch.set_num_threads(1)
    from miles_core.distributed.trainer import build_rank_trainer, close_rank, init_rank

    world = ctx["world"]
    try:
        device = ctx.get("device", "cpu")
        device = f"cuda:{rank}" if device == "cuda" else device  # a GPU a rank, of those visible
        device = init_rank(rank, size, "127.0.0.1", port, device, timeout_s=120)
        pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})

        def build(layout: str, resume: Path | None = None):
            args = make_args(ctx["ref"], [*COMMON, *FLAGS[layout]])
            trainer = build_rank_trainer(args, pm, str(resume / "model" if resume else ctx["policy"]), device)
            if resume:
                trainer.load_state(resume)
            return trainer, args

        torch.save(body(ctx, build), ctx["out"] / f"{world}_{rank}.pt")
        close_rank()
    except BaseException:
        (ctx["out"] / f"{world}_{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: str, body: Callable, size: int, ctx: dict, timeout: float = 180) -> list[dict]:
    """Run ``body`` in ``size`` fresh rank processes (``ctx["device"]``: "cpu", or "cuda" for one GPU a
    rank); returns each rank's result. ``ctx["world"]`` is ``world`` in the ranks: it names their files."""
    ctx = {**ctx, "world": world}
    procs = mp.start_processes(
        _rank_main, args=(body, size, _free_port(), ctx), nprocs=size, join=False, start_method="spawn"
    )
    try:
        for p in procs.processes:
            p.join(timeout)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [(ctx["out"] / f"{world}_{r}.err") for r in range(size)]
    for r, (p, err) in enumerate(zip(procs.processes, errors)):
        assert p.exitcode == 0, f"{world} rank {r} exited {p.exitcode}:\n" + (
            err.read_text() if err.exists() else ""
        )
    return [torch.load(ctx["out"] / f"{world}_{r}.pt") for r in range(size)]


# -------------------------------------------------------------------------------- comparing steps


def assert_same_step(
    a: dict,
    b: dict,
    rel: float = REL,
    abs_metric: float = 1e-7,
    atol: float = 1e-6,
    rtol: float | None = None,
) -> None:
    """Same metrics (to ``rel``/``abs_metric``) and the same updated weights (to ``rtol``, default ``rel``,
    and ``atol``), names in order. The defaults are fp32's on CPU: summation order is all that differs."""
    assert a["metrics"].keys() == b["metrics"].keys()
    for k, v in a["metrics"].items():
        assert v == pytest.approx(b["metrics"][k], rel=rel, abs=abs_metric), k
    assert [n for n, _ in a["weights"]] == [n for n, _ in b["weights"]]
    for (name, x), (_, y) in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(x, y, rtol=rel if rtol is None else rtol, atol=atol, msg=name)
