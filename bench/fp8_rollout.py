"""Benchmark: decode tokens/s of the built-in engine with FP8 weights (miles-fp8) vs BF16 weights.

Same random Qwen3-MoE, same prompts, same sampling (temperature 1, no EOS) in every arm; the FP8 arm's
model is converted by the plugin's own ``configure_model(role="rollout")`` hook and prepared by its
``pre_rollout`` hook, exactly as in `miles train`. Presets (bench/moe_config.py, shared with
bench/int4_rollout.py): ``gpu`` is the speed issue's ~0.7B model (vocab 32000, hidden 1024, 12 layers,
16/4 heads of 64, 32 experts top-4, expert FFN 512) at batch 64, 128 prompt + 256 new tokens;
``cpu-small`` is a smoke test (emulated FP8).

    python bench/fp8_rollout.py [--preset gpu|cpu-small] [--recipes rowwise,blockwise] [--batch N]

The FP8 experts size their per-expert loop on the host, so `pre_rollout` turns CUDA graphs off and FP8
decodes eagerly; the bf16 arm uses the engine's default (CUDA graphs on CUDA) and bf16_eager times bf16
without graphs, the like-for-like comparison. ``speedup`` = fp8 / bf16 (graphs), ``speedup_vs_eager`` =
fp8 / bf16_eager; tok_s counts generated tokens over the generate wall time (prefill included),
decode_tok_s the same over the decode steps only. Prints one JSON line.
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
for path in (ROOT, ROOT / "plugins" / "miles_fp8"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from moe_config import ROLLOUT_PRESETS, random_moe  # noqa: E402

from miles_core.args import parse_args  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.plugins import configure_plugins, get_plugin_manager  # noqa: E402

PRESETS = ROLLOUT_PRESETS


def fp8_plugin_manager(recipe: str):
    """A plugin manager with miles-fp8 alone, configured for ``--fp8-recipe RECIPE`` (unified FP8;
    statistics off, they are not timed): its run object does the engine-side conversion."""
    from miles_fp8 import plugin

    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[plugin])
    args = parse_args(["--fp8-recipe", recipe, "--fp8-stats-interval", "0"], pm)
    configure_plugins(pm, args)
    return pm, args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, p: dict, prompts: list[list[int]], device: torch.device, eager: bool = False) -> dict:
    """Generate once to warm up, then time `prompts` (``eager``: without CUDA graphs)."""

    def engine_for() -> Engine:
        return Engine(model, max_batch_size=p["batch"], seed=0, cuda_graph=False if eager else None)

    engine = engine_for()
    engine.generate_batch(prompts[:2], {"temperature": 1.0, "max_new_tokens": 4})  # warm-up (cache, kernels)
    _sync(device)
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": p["new"]})
    _sync(device)
    wall = time.perf_counter() - t0
    gen = sum(len(o.output_ids) for o in outs)
    t1 = time.perf_counter()  # one prefill alone, to separate it out of the decode rate
    engine_for().generate_batch(prompts, {"max_new_tokens": 1})
    _sync(device)
    prefill = time.perf_counter() - t1
    return {
        "tok_s": round(gen / wall, 1),
        "decode_tok_s": round((gen - len(prompts)) / max(wall - prefill, 1e-9), 1),
        "wall_s": round(wall, 3),
        "cuda_graph": bool(engine.cuda_graph),
    }


def _weight_bytes(model, buffers: bool) -> int:
    tensors = model.named_buffers() if buffers else model.named_parameters()
    return sum(t.numel() * t.element_size() for n, t in tensors if ".experts." in n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA")
    ap.add_argument("--recipes", default="rowwise", help="comma list of rowwise, blockwise, tensorwise")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ns = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and ns.preset != "cpu-small" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    preset = ns.preset or ("gpu" if device.type == "cuda" else "cpu-small")
    p = dict(PRESETS[preset])
    p["new"], p["batch"] = ns.new_tokens or p["new"], ns.batch or p["batch"]
    base = random_moe(p, device, torch.bfloat16).requires_grad_(False)
    rng = random.Random(0)
    prompts = [[rng.randrange(p["vocab"]) for _ in range(p["prompt"])] for _ in range(p["batch"])]
    recipes = ns.recipes.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {
        "bench": "fp8_rollout", "device": name,
        "preset": preset, "recipe": recipes[0], "batch": p["batch"], "prompt_len": p["prompt"],
        "new_tokens": p["new"], "bf16_expert_bytes": _weight_bytes(base, buffers=False),
    }  # fmt: skip
    arms = {"bf16": measure(base, p, prompts, device)}
    arms["bf16_eager"] = measure(base, p, prompts, device, eager=True)
    print(f"bf16: {arms['bf16']} bf16_eager: {arms['bf16_eager']}", file=sys.stderr, flush=True)
    for recipe in recipes:
        pm, args = fp8_plugin_manager(recipe)
        model = copy.deepcopy(base)
        pm.hook.configure_model(args=args, model=model, role="rollout")  # the engine-side conversion
        result[f"fp8_{recipe}_expert_bytes"] = _weight_bytes(model, buffers=True)
        # FP8 experts on CUDA declare cuda_graph_safe = False: the engine decodes them eagerly itself.
        arms[f"fp8_{recipe}"] = measure(model, p, prompts, device)
        print(f"fp8_{recipe}: {arms[f'fp8_{recipe}']}", file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for arm, vals in arms.items():
        result.update({f"{arm}_{k}": v for k, v in vals.items()})
    main_arm = f"fp8_{recipes[0]}"
    result["fp8_tok_s"] = arms[main_arm]["tok_s"]
    result["speedup"] = round(arms[main_arm]["tok_s"] / arms["bf16"]["tok_s"], 3)
    result["speedup_vs_eager"] = round(arms[main_arm]["tok_s"] / arms["bf16_eager"]["tok_s"], 3)
    result["decode_speedup_vs_eager"] = round(
        arms[main_arm]["decode_tok_s"] / arms["bf16_eager"]["decode_tok_s"], 3
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
