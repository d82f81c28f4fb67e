"""Weight updates over HTTP, each `--update-weights-mode` on the same engines: the seconds
`HttpEngine.update_weights` takes to push a model's weights into N local `miles serve` processes, each
mode timed on its second update (the first also builds the distributed group). Prints one JSON line.
The engines share the trainer's device, so distributed goes over Gloo; over NCCL, engines on GPUs of
their own: bench/weight_sync.py.

    python bench/weight_update.py                       # gpu-0.7b, 1 engine
    python bench/weight_update.py --preset cpu-small --engines 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import PRESETS, make_model  # noqa: E402

from miles_core.args import parse_args  # noqa: E402
from miles_core.model import named_hf_tensors, save_model  # noqa: E402
from miles_core.serve.client import HttpEngine  # noqa: E402

MODES = ("tensor", "disk", "distributed")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-0.7b")
    ap.add_argument("--engines", type=int, default=1, help="Local miles serve processes.")
    a = ap.parse_args(argv)
    preset = PRESETS[a.preset]
    device = preset["device"]
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "preset": a.preset,
        "engines": a.engines,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(preset)
        save_model(model, tmp + "/ckpt")
        trainer_side = make_model({**preset, "dtype": torch.float32}, seed=1)  # the trainer's fp32 weights
        result["weights_mb"] = round(sum(t.numel() * 4 for _, t in named_hf_tensors(trainer_side)) / 2**20, 1)
        flags = ["--hf-checkpoint", tmp + "/ckpt", "--prompt-data", "x", "--rollout-batch-size", "8"]
        flags += ["--num-rollout", "1", "--device", device, "--run-dir", tmp + "/run"]
        flags += ["--rollout-num-engines", str(a.engines), "--rollout-dtype", str(preset["dtype"])[6:]]
        with HttpEngine.from_args(parse_args(flags), None, None) as fleet:
            urls = fleet.engine_urls()
            for mode in MODES:
                args = parse_args([*flags, "--update-weights-mode", mode, "--rollout-engine-urls", *urls])
                with HttpEngine.from_args(args, None, None) as client:
                    for version in (1, 2):
                        t0 = time.perf_counter()
                        client.update_weights(named_hf_tensors(trainer_side), version)
                        seconds = time.perf_counter() - t0
                    result[f"{mode}_s"] = round(seconds, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
