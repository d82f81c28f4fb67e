"""Benchmark: decode tokens/s of the built-in engine with packed INT4 expert weights vs BF16 weights.

Same random Qwen3-MoE, same prompts, same sampling settings in every arm; only the expert weights'
format differs (swapped through the miles-int4qat plugin). Presets (bench/moe_config.py): ``gpu`` is
the speed issue's ~0.7B model (vocab 32000, hidden 1024, 12 layers, 16/4 heads of 64, 32 experts top-4,
expert FFN 512), ``qwen3-30b-a3b`` Qwen3-30B-A3B's layer shape (``--layers``, 8 by default), both at
batch 64, 128 prompt + 256 new tokens; ``cpu-small`` is a smoke test.

    python bench/int4_rollout.py [--preset gpu|qwen3-30b-a3b|cpu-small] [--layers N] [--batch N]
        [--arms bf16,bf16_eager,int4,int4-tinygemm,int4-dequant] [--no-compile]

Every arm runs as `miles train` sets the engine up: CUDA graphs on CUDA and the decode step compiled
(``--no-compile`` turns that off), bf16 experts on the Triton decode kernels where they run. ``int4``
(the auto kernel) runs the grouped W4A16 Triton expert kernels, which CUDA graphs capture;
``int4-tinygemm`` / ``int4-dequant`` keep the per-expert loop, which syncs with the host and so decodes
eagerly. bf16_eager_* times bf16 without graphs or compile.

Prints one JSON line: per arm tok_s (generated tokens / generate wall time, prefill included),
decode_tok_s (the same over the decode steps only) and the engine's expert-weight bytes; int4_vs_bf16 is
the ratio of tok_s.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "plugins" / "miles_int4qat"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from miles_int4qat.modules import (  # noqa: E402
    int4_bytes,
    quantize_for_rollout,
    scope_weight_numel,
)
from moe_config import ROLLOUT_PRESETS, random_moe, rollout_engine  # noqa: E402

from miles_core.engine import Engine  # noqa: E402

PRESETS = ROLLOUT_PRESETS


def measure(
    model, p: dict, prompts: list[list[int]], device: torch.device, eager: bool = False, compile: bool = False
) -> dict:
    # Loop-kernel INT4 experts declare cuda_graph_safe = False, so the engine decodes them eagerly itself.
    engine = rollout_engine(model, p["batch"], eager=eager, compile=compile)
    params = {"temperature": 1.0, "max_new_tokens": p["new"]}
    # Warm-up over the timed shapes: every batch and key-length bucket captured, every kernel compiled.
    engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": p["new"]})
    engine.stats.update(prefill_tokens=0, decode_steps=0, generated_tokens=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gen = sum(len(o.output_ids) for o in outs)
    # Time one prefill alone to separate it out: the decode rate is what the weight format changes.
    t1 = time.perf_counter()
    Engine(model, max_batch_size=p["batch"], seed=0).generate_batch(prompts, {"max_new_tokens": 1})
    if device.type == "cuda":
        torch.cuda.synchronize()
    prefill = time.perf_counter() - t1
    decode_tokens = gen - len(prompts)
    return {
        "tok_s": round(gen / wall, 1),
        "decode_tok_s": round(decode_tokens / max(wall - prefill, 1e-9), 1),
        "wall_s": round(wall, 3),
        "generated_tokens": gen,
        "cuda_graph": bool(engine.cuda_graph),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--arms",
        default="bf16,bf16_eager,int4",
        help="comma list of bf16, bf16_eager (no CUDA graphs), int4 (auto kernel: grouped Triton experts "
        "on CUDA), int4-tinygemm, int4-dequant (per-expert loops)",
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the decode step (--rollout-compile) in every graphed arm; default on CUDA",
    )  # fmt: skip
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ns = ap.parse_args(argv)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    p = dict(PRESETS[ns.preset or ("gpu" if device.type == "cuda" else "cpu-small")])
    p["new"] = ns.new_tokens or p["new"]
    p["batch"] = ns.batch or p["batch"]
    p["layers"] = ns.layers or p["layers"]
    compile = device.type == "cuda" if ns.compile is None else ns.compile
    base = random_moe(p, device, torch.bfloat16).requires_grad_(False)
    rng = random.Random(0)
    prompts = [[rng.randrange(p["vocab"]) for _ in range(p["prompt"])] for _ in range(p["batch"])]
    result: dict = {
        "bench": "int4_rollout",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": ns.preset or ("gpu" if device.type == "cuda" else "cpu-small"),
        "batch": p["batch"], "prompt_len": p["prompt"], "new_tokens": p["new"], "group_size": ns.group_size,
        "layers": p["layers"], "compile": compile,
        "bf16_expert_bytes": 2 * scope_weight_numel(base, "experts"),
    }  # fmt: skip
    for arm in ns.arms.split(","):
        model = base if arm.startswith("bf16") else copy.deepcopy(base)
        if not arm.startswith("bf16"):
            kind = arm.split("-", 1)[1] if "-" in arm else "auto"
            quantize_for_rollout(model, "experts", ns.group_size, kind=kind)
            experts = model.model.layers[0].mlp.experts
            result[f"{arm}_kernel"] = "grouped-triton" if experts.grouped else experts.kernel.kind
            result[f"{arm}_expert_bytes"] = int4_bytes(model)
        eager = arm == "bf16_eager"
        vals = measure(model, p, prompts, device, eager, compile and not eager)
        result.update({f"{arm}_{k}": v for k, v in vals.items()})
        print(f"{arm}: {vals}", file=sys.stderr, flush=True)
        if model is not base:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "bf16_tok_s" in result and "int4_tok_s" in result:
        result["int4_vs_bf16"] = round(result["int4_tok_s"] / result["bf16_tok_s"], 3)
        result["int4_vs_bf16_decode"] = round(result["int4_decode_tok_s"] / result["bf16_decode_tok_s"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
