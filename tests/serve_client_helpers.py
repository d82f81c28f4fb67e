"""Helpers of the HTTP rollout client's tests: run flags, clients over running engines, the in-process
engine's answers to compare with, and waiting on a condition."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.model import load_model
from miles_core.serve.client import HttpEngine
from miles_core.testing import Served

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [5, 6, 7, 8]]
SEEDED = {"temperature": 1.0, "max_new_tokens": 10}


def run_args(tmp_path: Path, ckpt: Path, *flags: str):
    argv = ["--hf-checkpoint", str(ckpt), "--prompt-data", "unused.jsonl", "--rollout-batch-size", "4"]
    argv += ["--num-rollout", "1", "--device", "cpu", "--run-dir", str(tmp_path / "run"), *flags]
    return parse_args(argv)


def client_over(tmp_path, ckpt, servers: tuple[Served, ...], *flags: str) -> HttpEngine:
    urls = [s.url for s in servers]
    return HttpEngine.from_args(run_args(tmp_path, ckpt, "--rollout-engine-urls", *urls, *flags), None, None)


def generate_all(client: HttpEngine, prompts, params, seeds=None):
    async def all_():
        return await asyncio.gather(
            *(
                client.generate(p, params if seeds is None else {**params, "sampling_seed": s})
                for p, s in zip(prompts, seeds or [None] * len(prompts))
            )
        )

    return asyncio.run(all_())


def local_engine(ckpt, routes=False) -> Engine:
    engine = Engine(load_model(ckpt).eval(), None, max_batch_size=8)
    engine.capture_routes = routes
    return engine


def local_seeded(ckpt, prompts, seeds, routes=False):
    """The in-process engine's answers, one explicit sampling seed a prompt."""
    engine = local_engine(ckpt, routes)

    async def all_():
        return await asyncio.gather(
            *(engine.generate(p, {**SEEDED, "sampling_seed": s}) for p, s in zip(prompts, seeds))
        )

    return asyncio.run(all_())


def same_tokens(got, want):
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    for g, w in zip(got, want):
        assert np.allclose(g.log_probs, w.log_probs, atol=1e-5)


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def pid_of(marker: str) -> int | None:
    """The process whose command line holds ``marker`` (a local engine, by its port file)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return int(entry.name)
            except OSError:
                continue
    return None
