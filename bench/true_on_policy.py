"""Cost of --true-on-policy-mode: whole `miles train` GRPO runs with and without the mode, in one process.

Both arms run the same flags on the demo checkpoint (or ``--hf-checkpoint``), interleaved (normal, mode,
normal, mode, ...) so load on a shared machine hits both alike. Per arm: the median over runs of the
rollout tokens/s and of the train time per rollout (log-probs + optimizer steps), the first rollout of
each run left out (warm-up), and the largest train/rollout log-prob difference seen. Extra flags after
``--`` go to both arms (e.g. ``-- --device cuda --bf16``). Prints one JSON line.

    python bench/true_on_policy.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from miles_core.cli import main

REPO = Path(__file__).resolve().parent.parent


def _flags(args: argparse.Namespace, run: Path) -> list[str]:
    data = REPO / "examples" / "arith" / "data" / "train.jsonl"
    return [
        "train", "--hf-checkpoint", args.hf_checkpoint, "--prompt-data", str(data), "--input-key", "prompt",
        "--label-key", "label", "--apply-chat-template", "--rollout-shuffle", "--rm-type", "math",
        "--rollout-batch-size", str(args.prompts), "--n-samples-per-prompt", "8",
        "--num-rollout", str(args.rollouts), "--rollout-max-response-len", "10", "--lr", "1e-4",
        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "2048", "--run-dir", str(run), *args.extra,
    ]  # fmt: skip


def _run(args: argparse.Namespace, mode: bool, out: Path) -> list[dict]:
    run = out / f"{'mode' if mode else 'normal'}-{time.monotonic_ns()}"
    flags = _flags(args, run) + (["--true-on-policy-mode"] if mode else [])
    if main(flags) != 0:
        raise SystemExit(f"miles train failed: {' '.join(flags)}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/train_time" in r][1:]


def _summary(rows: list[dict]) -> dict:
    return {
        "rollout_tok_per_s": statistics.median(r["rollout/tok_per_s"] for r in rows),
        "train_s_per_rollout": statistics.median(r["perf/train_time"] for r in rows),
        "max_logprob_abs_diff": max(r["train/train_rollout_logprob_abs_diff"] for r in rows),
        "max_abs_kl": max(abs(r["train/train_rollout_kl"]) for r in rows),
    }


def bench() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-checkpoint", default=str(REPO / "examples" / "arith" / "checkpoint"))
    p.add_argument("--prompts", type=int, default=8, help="prompts a rollout (8 samples each)")
    p.add_argument("--rollouts", type=int, default=4, help="rollouts a run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=2, help="runs per arm, interleaved")
    p.add_argument("extra", nargs="*", help="flags for both arms, after --")
    args = p.parse_args()
    rows: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in (False, True):
                rows[mode] += _run(args, mode, Path(tmp))
    normal, mode = _summary(rows[False]), _summary(rows[True])
    return {
        "bench": "true_on_policy",
        "threads": torch.get_num_threads(),
        "normal": normal,
        "mode": mode,
        "rollout_slowdown": normal["rollout_tok_per_s"] / mode["rollout_tok_per_s"],
        "train_slowdown": mode["train_s_per_rollout"] / normal["train_s_per_rollout"],
    }


if __name__ == "__main__":
    print(json.dumps(bench()))
