"""GRPO throughput as the run spreads over more devices: whole `miles train --use-ray` steps (generate,
reward, train, weight update) per second for each layout of N GPUs, and the scaling efficiency of each
layout against the smallest one of its mode in the same call.

How N GPUs are split (on CPU, ``--device cpu``, the same flags count processes):

- ``disagg``: N/2 trainer ranks (FSDP2, NCCL) on GPUs 0..N/2-1 and N/2 `miles serve` engine actors on
  the others (``--actor-num-gpus-per-node N/2 --rollout-num-gpus N/2``); N must be even, so the smallest
  is 2 (1 + 1). N = 1 and odd N are skipped, and listed under ``skipped``.
- ``colocate``: N trainer ranks, each sharing its GPU with one engine (``--actor-num-gpus-per-node N
  --colocate``); from N = 1.

Each layout is one `miles train` process of its own (it starts Ray on 127.0.0.1 and stops it) on the
checkpoint and shape of bench/async_grpo.py (random Qwen3-MoE of ``--preset``, 8 prompts x 8 samples and
128 new tokens on gpu-0.7b). ``--scaling weak`` (default) gives each layout 8 prompts per engine, so
every rank trains and every engine generates as much as at the smallest layout; ``strong`` keeps the
preset's 8 prompts for every layout. Timings come from the run's metrics.jsonl: ``perf/step_time`` of
the ``--steps`` rollouts after ``--warmup`` untimed ones (start-up, CUDA-graph captures), so
``samples_s`` = samples / step time and ``tokens_s`` = generated tokens / step time over those steps.
``efficiency`` = samples_s(N) / (N / N0 * samples_s(N0)), N0 the smallest N of the same mode (1.0: N
GPUs do N/N0 times the work of N0). Prints one JSON line.

    python bench/scale.py --gpus 1,2,4,8                  # gpu-0.7b, both modes, the visible GPUs
    python bench/scale.py --preset cpu-small --gpus 1,2   # CPU ranks
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from async_grpo import bench_run
from grpo_vs_trl import SHAPES
from rollout import PRESETS
from train_scale import device_counts

MODES = ("disagg", "colocate")
RUN_TIMEOUT_S = 3600.0


def layout(mode: str, gpus: int) -> tuple[list[str], int, int] | str:
    """The `miles train` layout flags of ``mode`` on ``gpus`` devices and its (trainer ranks, engines), or
    the sentence saying why that layout does not exist."""
    if mode == "colocate":
        return ["--actor-num-gpus-per-node", str(gpus), "--colocate"], gpus, gpus
    if gpus < 2 or gpus % 2:
        return f"disagg on {gpus} GPU{'s' * (gpus != 1)}: it takes N/2 trainer ranks + N/2 engines, N even"
    half = gpus // 2
    return ["--actor-num-gpus-per-node", str(half), "--rollout-num-gpus", str(half)], half, half


def efficiency(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per mode, samples_s(N) / (N / N0 * samples_s(N0)) of each layout, N0 the mode's smallest N."""
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["gpus"])
        base = mine[0]
        out[mode] = {
            str(r["gpus"]): round(r["samples_s"] / (r["gpus"] / base["gpus"] * base["samples_s"]), 4)
            for r in mine
        }
    return out


def with_values(flags: list[str], values: dict[str, str]) -> list[str]:
    """``flags`` with the value after each flag of ``values`` replaced."""
    out = list(flags)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def run_layout(flags: list[str], run_dir: Path) -> None:
    """One `miles train` process; on failure, its log's tail and one sentence."""
    log = run_dir.with_suffix(".log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "miles_core.cli", "train", *flags, "--run-dir", str(run_dir)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        rc = proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if proc.poll() is None:  # its Ray cluster and actors are in its session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    if rc != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"`miles train {' '.join(flags)}` ended with {rc}; its log's tail is above.")


def measure(run_dir: Path, warmup: int) -> dict[str, float]:
    """Throughput over the rollouts after the first ``warmup`` (metrics.jsonl's per-step numbers)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "perf/step_time" in r][warmup:]
    seconds = sum(r["perf/step_time"] for r in timed)
    samples = sum(r["rollout/num_samples"] for r in timed)
    tokens = sum(r["rollout/num_samples"] * r["rollout/response_len_mean"] for r in timed)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in timed) / len(timed), 4)

    return {
        "s_per_step": round(seconds / len(timed), 4),
        "samples_s": round(samples / seconds, 3),
        "tokens_s": round(tokens / seconds, 1),
        "rollout_s": mean("rollout/time_s"),
        "train_s": mean("perf/train_time"),
        "update_weights_s": mean("perf/update_weights_time"),
        "response_len_mean": mean("rollout/response_len_mean"),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="1,2,4", help="Comma-separated device counts N (default 1,2,4).")
    ap.add_argument("--modes", default="disagg,colocate", help="Comma-separated: disagg, colocate.")
    ap.add_argument("--steps", type=int, default=4, help="Timed rollouts per layout (after --warmup).")
    ap.add_argument("--warmup", type=int, default=2, help="Untimed first rollouts per layout (default 2).")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="gpu-0.7b")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="Default: the preset's.")
    ap.add_argument(
        "--scaling",
        choices=["weak", "strong"],
        default="weak",
        help="weak: the preset's prompts per engine; strong: the preset's prompts per step.",
    )
    a = ap.parse_args(argv)
    a.device = a.device or PRESETS[a.preset]["device"]
    a.gpus = device_counts(ap, a.gpus, "--gpus", a.device == "cuda")
    a.modes = list(dict.fromkeys(a.modes.split(",")))
    if min(a.gpus) < 1 or not set(a.modes) <= set(MODES) or a.steps < 1 or a.warmup < 0:
        ap.error("--gpus takes counts >= 1, --modes disagg and/or colocate, --steps >= 1, --warmup >= 0.")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    preset, shape = dict(PRESETS[a.preset], device=a.device), SHAPES[a.preset]
    if a.device == "cpu":
        preset["dtype"] = torch.float32
    plan, skipped = [], []
    for mode in a.modes:
        for n in a.gpus:
            lay = layout(mode, n)
            if isinstance(lay, str):
                skipped.append(lay)
            else:
                plan.append((mode, n, lay))
    if not plan:
        raise SystemExit(f"no layout to run: {'; '.join(skipped)}.")
    p, g = shape["prompts"], shape["group"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # The checkpoint is written from the CPU: this process keeps no GPU memory while the runs go.
        base = bench_run(tmp, dict(preset, device="cpu"), shape, a.warmup + a.steps)
        base = with_values(base, {"--device": a.device}) + ["--use-ray"] + ["--bf16"] * (a.device == "cuda")
        for mode, n, (extra, ranks, engines) in plan:
            prompts = p * engines if a.scaling == "weak" else p
            flags = with_values(base, {"--rollout-batch-size": str(prompts),
                                       "--global-batch-size": str(prompts * g)})  # fmt: skip
            run_dir = Path(tmp, f"{mode}-{n}")
            run_layout(flags + extra, run_dir)
            row = {"mode": mode, "gpus": n, "trainer_ranks": ranks, "engines": engines,
                   "samples_per_step": prompts * g, **measure(run_dir, a.warmup)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    eff = efficiency(rows)
    for row in rows:
        row["efficiency"] = eff[row["mode"]][str(row["gpus"])]
    result = {
        "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        "preset": a.preset, "scaling": a.scaling, "steps": a.steps, "warmup": a.warmup,
        "new_tokens": shape["completion"], "layouts": rows, "efficiency": eff, "skipped": skipped,
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
