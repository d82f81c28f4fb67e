"""Colocated on Ray vs the in-process loop: whole `miles train` GRPO steps (generate, reward, train, weight
update) per second with one FSDP2 trainer rank and one `miles serve` engine actor sharing the device
(``--use-ray --colocate``), and with the single-process default, on the same checkpoint, flags and device,
in one process. Also the colocated weight update (the rank gathers the weights and hands them to its
engine in place: CUDA IPC) and the device's peak memory in use (all processes, sampled every 20 ms). The
checkpoint and shape are bench/async_grpo.py's; the first two rollouts (start-up, captures) are not timed.
Prints one JSON line.

    python bench/colocate_grpo.py                   # gpu-0.7b
    python bench/colocate_grpo.py --preset cpu-small
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from async_grpo import bench_run, timed_run
from grpo_vs_trl import SHAPES
from rollout import PRESETS


class PeakMemory:
    """The device's peak memory in use (every process), from cudaMemGetInfo every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def metric(run_dir: str, key: str) -> list[float]:
    rows = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="gpu-0.7b")
    ap.add_argument("--rollouts", type=int, default=8, help="Rollouts per arm (the first 2 are not timed).")
    a = ap.parse_args(argv)
    preset, shape = PRESETS[a.preset], SHAPES[a.preset]
    device = preset["device"]
    out: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": a.preset}
    with tempfile.TemporaryDirectory() as tmp:
        flags = bench_run(tmp, preset, shape, a.rollouts)
        p, g = shape["prompts"], shape["group"]
        for name, extra in (("in_process", []), ("colocate", ["--use-ray", "--colocate"])):
            run_dir = f"{tmp}/{name}"
            with PeakMemory() as mem:
                stamps = timed_run(flags + extra, run_dir)
            step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
            out[f"{name}_s_per_step"] = round(step, 4)
            out[f"{name}_samples_s"] = round(p * g / step, 2)
            sync = metric(run_dir, "perf/update_weights_time")[1:]  # the first includes start-up work
            out[f"{name}_update_weights_s"] = round(float(np.median(sync)), 4)
            out[f"{name}_peak_device_gb"] = round(mem.peak / 2**30, 2)
            for key in ("rollout/response_len_mean", "train/train_rollout_logprob_abs_diff"):
                values = metric(run_dir, key)[2:]  # same lengths and a small diff: the same work, synced
                if values:
                    out[f"{name}_{key.split('/')[1]}"] = round(float(np.mean(values)), 6)
            for key in ("perf/train_time", "train/engine_release_s", "train/onload_s",
                        "train/engine_resume_s",
                        "train/hand_over_s", "train/offload_s"):  # fmt: skip
                values = metric(run_dir, key)[2:]
                if values:
                    out[f"{name}_{key.split('/')[1]}"] = round(float(np.median(values)), 4)
            peaks = metric(run_dir, "train/peak_memory_gb")
            if peaks:
                out[f"{name}_trainer_peak_allocated_gb"] = round(max(peaks), 2)
            if device == "cuda":
                torch.cuda.empty_cache()
    out["colocate_vs_in_process"] = round(out["colocate_s_per_step"] / out["in_process_s_per_step"], 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
