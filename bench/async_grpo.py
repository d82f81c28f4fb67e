"""Async vs sync GRPO: whole `miles train` rollouts (generate, reward, train, weight sync) per second,
with `--async` (rollout k+1 generated while training on k, `--max-weight-staleness 1`) and without, on
the same checkpoint, data, flags and device, in one process. The checkpoint is bench/rollout.py's random
Qwen3-MoE with the demo's tokenizer; the shape is bench/grpo_vs_trl.py's (8 prompts x 8 samples, 128
new tokens on the GPU preset). Steady state: the first two rollouts (captures, compiles) are not timed.
Prints one JSON line.

    python bench/async_grpo.py                      # gpu-0.7b
    python bench/async_grpo.py --preset cpu-small
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from grpo_vs_trl import SHAPES
from rollout import PRESETS, make_model

from miles_core import logging as miles_logging
from miles_core.args import check_run_args, parse_args
from miles_core.loop import run
from miles_core.model import save_model
from miles_core.plugins import configure_plugins, get_plugin_manager

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "arith"


def timed_run(flags: list[str], run_dir: str) -> list[float]:
    """Run `miles train` with ``flags``; returns the time each rollout's metrics were logged."""
    stamps: list[float] = []
    log = miles_logging.MetricsLogger.log

    def stamped(self, step, metrics, prefix=""):
        if any(k.startswith("rollout/") for k in metrics) and not prefix:
            stamps.append(time.perf_counter())
        return log(self, step, metrics, prefix)

    miles_logging.MetricsLogger.log = stamped
    try:
        pm = get_plugin_manager()
        args = parse_args([*flags, "--run-dir", run_dir], pm)
        check_run_args(args)
        configure_plugins(pm, args)
        run(args, pm)
    finally:
        miles_logging.MetricsLogger.log = log
    return stamps


def bench_run(tmp: str, preset: dict, shape: dict, rollouts: int) -> list[str]:
    """Write the bench checkpoint under ``tmp``; the `miles train` flags of a GRPO run on it."""
    save_model(make_model(preset), Path(tmp, "ckpt"), tokenizer_src=str(DEMO / "checkpoint"))
    p, g, device = shape["prompts"], shape["group"], preset["device"]
    flags = [
        "--hf-checkpoint", f"{tmp}/ckpt", "--prompt-data", str(DEMO / "data" / "train.jsonl"),
        "--input-key", "prompt", "--label-key", "label", "--apply-chat-template", "--rm-type", "math",
        "--rollout-batch-size", str(p), "--n-samples-per-prompt", str(g),
        "--rollout-max-response-len", str(shape["completion"]), "--global-batch-size", str(p * g),
        "--num-rollout", str(rollouts), "--lr", "1e-6", "--advantage-estimator", "grpo",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "16384", "--device", device,
    ]  # fmt: skip
    return flags + (["--bf16"] if device == "cuda" else [])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="gpu-0.7b")
    ap.add_argument("--rollouts", type=int, default=8, help="Rollouts per arm (the first 2 are not timed).")
    a = ap.parse_args(argv)
    preset, shape = PRESETS[a.preset], SHAPES[a.preset]
    device = preset["device"]
    with tempfile.TemporaryDirectory() as tmp:
        flags = bench_run(tmp, preset, shape, a.rollouts)
        p, g = shape["prompts"], shape["group"]
        arms = {}
        for name, extra in (("sync", []), ("async", ["--async", "--max-weight-staleness", "1"])):
            stamps = timed_run(flags + extra, f"{tmp}/{name}")
            arms[name] = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            if device == "cuda":
                torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": a.preset,
        "samples_per_rollout": p * g,
        "new_tokens": shape["completion"],
        "timed_rollouts": a.rollouts - 2,
        "sync_s_per_rollout": round(arms["sync"], 4),
        "async_s_per_rollout": round(arms["async"], 4),
        "sync_samples_s": round(p * g / arms["sync"], 2),
        "async_samples_s": round(p * g / arms["async"], 2),
        "speedup": round(arms["sync"] / arms["async"], 3),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
