"""Benchmark: decode tokens/s of the built-in engine with FP8 weights (miles-fp8) vs BF16 weights.

Same random Qwen3-MoE, same prompts, same sampling (temperature 1, no EOS) in every arm; the FP8 arm's
model is converted by the plugin's own ``configure_model(role="rollout")`` hook and prepared by its
``pre_rollout`` hook, exactly as in `miles train`. Presets (bench/moe_config.py, shared with
bench/int4_rollout.py): ``gpu`` is the speed issue's ~0.7B model (vocab 32000, hidden 1024, 12 layers,
16/4 heads of 64, 32 experts top-4, expert FFN 512), ``qwen3-30b-a3b`` Qwen3-30B-A3B's layer shape
(``--layers``, 8 by default), both at batch 64, 128 prompt + 256 new tokens; ``cpu-small`` is a smoke
test (emulated FP8).

    python bench/fp8_rollout.py [--preset gpu|qwen3-30b-a3b|cpu-small] [--layers N] [--batch N]
        [--recipes blockwise,rowwise] [--no-compile] [--expert-block-m 16|64]
        [--products fp8|fp8acc|fp16|bf16]
        [--dense-quant fused|kernel]

Every graphed arm runs as `miles train` sets the engine up: CUDA graphs on CUDA and the decode step
compiled (``--no-compile`` turns that off), bf16 experts on the Triton decode kernels where they run.
``blockwise`` FP8 experts run the grouped FP8 Triton kernels and its dense linears the Triton blockwise
GEMM (``fp8_blockwise_dense_path``, ``fp8_blockwise_experts_grouped``), which CUDA graphs capture;
``rowwise`` / ``tensorwise`` experts loop per expert, sync with the host and so decode eagerly
(``*_cuda_graph`` says which). bf16_eager times bf16 without graphs or compile. ``speedup`` = fp8 / bf16
(graphs),
``speedup_vs_eager`` = fp8 / bf16_eager; tok_s counts generated tokens over the generate wall time
(prefill included), decode_tok_s the same over the decode steps only. Prints one JSON line.
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

from moe_config import ROLLOUT_PRESETS, random_moe, rollout_engine  # noqa: E402

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


def measure(
    model, p: dict, prompts: list[list[int]], device: torch.device, eager: bool = False, compile: bool = False
) -> dict:
    """Generate once to warm up, then time `prompts` (``eager``: without CUDA graphs)."""

    def engine_for() -> Engine:
        return Engine(model, max_batch_size=p["batch"], seed=0, cuda_graph=False if eager else None)

    engine = rollout_engine(model, p["batch"], eager=eager, compile=compile)
    # Warm-up over the timed shapes: every batch and key-length bucket captured, every kernel compiled.
    engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": p["new"]})
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


def _fp8_paths(model, device: torch.device) -> dict:
    """How the converted model's FP8 layers compute here: the dense linears' GEMM (`gemm_path`: triton,
    scaled_mm or emulate) and whether the experts run the grouped kernels."""
    from miles_fp8 import triton_experts
    from miles_fp8.linear import Fp8Experts, Fp8Linear, gemm_path

    lin = next(m for m in model.modules() if isinstance(m, Fp8Linear))
    x = torch.zeros(1, lin.in_features, device=device, dtype=torch.bfloat16)
    experts = [m for m in model.modules() if isinstance(m, Fp8Experts)]
    grouped = bool(experts) and all(m.grouped for m in experts) and triton_experts.device_ok(device)
    return {"dense_path": gemm_path(x, lin.weight, lin.recipe), "experts_grouped": grouped}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu on CUDA")
    ap.add_argument("--recipes", default="blockwise", help="comma list of blockwise, rowwise, tensorwise")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="compile the decode step (--rollout-compile) in every graphed arm; default on CUDA",
    )  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument(
        "--expert-block-m", type=int, choices=[16, 64], default=None,
        help="rows per expert tile of the grouped FP8 kernels in decode (triton_experts.DECODE_BLOCK_M, "
        "16 by default; on Hopper tiles below 64 rows multiply in fp16 mma.sync, 64 on FP8 wgmma)",
    )  # fmt: skip
    ap.add_argument(
        "--products", choices=["fp8", "fp8acc", "fp16", "bf16"], default=None,
        help="how the FP8 Triton kernels multiply (default: what the per-card probe picks; "
        "fp8 = FP8 wgmma, fp8acc = the same without fp32 promotion inside a 128 block, fp16 / bf16 = e4m3 "
        "codes upcast exactly); forced, the probe is skipped",
    )  # fmt: skip
    ap.add_argument(
        "--dense-quant", choices=["fused", "kernel"], default="fused",
        help="dense FP8 linears below 512 rows: x quantized by the fused pass before the GEMM (fused, the "
        "default where the card's probe finds the same bits) or inside the GEMM per column tile (kernel)",
    )  # fmt: skip
    ns = ap.parse_args(argv)
    from miles_fp8 import triton_experts, triton_fp8

    if ns.expert_block_m:
        triton_experts.DECODE_BLOCK_M = ns.expert_block_m

    device = torch.device("cuda" if torch.cuda.is_available() and ns.preset != "cpu-small" else "cpu")
    if ns.products:
        if device.type != "cuda":
            ap.error("--products needs a CUDA device (the CPU runs the emulation)")
        triton_fp8.force_mode(torch.device("cuda", torch.cuda.current_device()), ns.products)
    triton_fp8.DENSE_PREQ = ns.dense_quant == "fused"
    if device.type == "cpu":
        torch.set_num_threads(1)
    preset = ns.preset or ("gpu" if device.type == "cuda" else "cpu-small")
    p = dict(PRESETS[preset])
    p["new"], p["batch"] = ns.new_tokens or p["new"], ns.batch or p["batch"]
    p["layers"] = ns.layers or p["layers"]
    compile = device.type == "cuda" if ns.compile is None else ns.compile
    base = random_moe(p, device, torch.bfloat16).requires_grad_(False)
    rng = random.Random(0)
    prompts = [[rng.randrange(p["vocab"]) for _ in range(p["prompt"])] for _ in range(p["batch"])]
    recipes = ns.recipes.split(",")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: dict = {
        "bench": "fp8_rollout", "device": name,
        "preset": preset, "recipe": recipes[0], "batch": p["batch"], "prompt_len": p["prompt"],
        "new_tokens": p["new"], "layers": p["layers"], "compile": compile,
        "expert_block_m": triton_experts.DECODE_BLOCK_M,
        "bf16_expert_bytes": _weight_bytes(base, buffers=False),
    }  # fmt: skip
    arms = {"bf16": measure(base, p, prompts, device, compile=compile)}
    arms["bf16_eager"] = measure(base, p, prompts, device, eager=True)
    print(f"bf16: {arms['bf16']} bf16_eager: {arms['bf16_eager']}", file=sys.stderr, flush=True)
    for recipe in recipes:
        pm, args = fp8_plugin_manager(recipe)
        model = copy.deepcopy(base)
        pm.hook.configure_model(args=args, model=model, role="rollout")  # the engine-side conversion
        result[f"fp8_{recipe}_expert_bytes"] = _weight_bytes(model, buffers=True)
        result.update({f"fp8_{recipe}_{k}": v for k, v in _fp8_paths(model, device).items()})
        # Looped FP8 experts on CUDA declare cuda_graph_safe = False: the engine decodes them eagerly.
        arms[f"fp8_{recipe}"] = measure(model, p, prompts, device, compile=compile)
        print(f"fp8_{recipe}: {arms[f'fp8_{recipe}']}", file=sys.stderr, flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for arm, vals in arms.items():
        result.update({f"{arm}_{k}": v for k, v in vals.items()})
    main_arm = f"fp8_{recipes[0]}"
    result["fp8_products"] = triton_fp8.device_mode(device) if triton_fp8.triton is not None else "off"
    result["fp8_preq"] = triton_fp8.preq_ok(device) if result["fp8_products"] != "off" else False
    result["fp8_dense_quant"] = ns.dense_quant
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
