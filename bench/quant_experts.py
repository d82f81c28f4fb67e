"""Benchmark: one MoE layer's expert kernels alone, bf16 vs blockwise FP8 vs INT4 (W4A16), at decode.

The engine's decode step is bound by its expert kernels on the Qwen3-30B-A3B shape (128 experts, hidden
2048, expert FFN 768, top-8): this times them without the rest of the model. Same random weights and
routing in every arm: bf16 `miles_core.model.fused_moe.fused_experts`, the FP8 plugin's grouped
`fp8_experts` once per way of multiplying (``--products``: FP8 wgmma, or e4m3 codes upcast exactly to
fp16 / bf16; the per-card probe normally picks one), and the INT4 plugin's grouped `int4_experts`
(group 128). Each arm is replayed from a CUDA graph of 10 calls (launch overhead out) and reports
microseconds a call, the expert-weight bytes it streams and that rate in TB/s, and its relative error
against the bf16 arm (quantization included). Prints one JSON line.

    python bench/quant_experts.py [--tokens 64] [--products fp8,fp8acc,fp16,bf16] [--fp8-down-decode-n 64]
    python bench/quant_experts.py --int4-tiles 64:4:3:64,64:4:3:128,128:8:3:128 --int4-block-m 16,32,64

``--int4-tiles`` (BLOCK_N:num_warps:num_stages[:BLOCK_K] each, BLOCK_K the K tile's cap) times the INT4
gate/up kernel at each setting with the down kernel at its current one (`triton_experts.GATE_UP` /
`DOWN`), then the down kernel likewise (`int4_sweep_gate_up`, `int4_sweep_down`); ``--int4-block-m``
times both at each decode row block (`DECODE_BLOCK_M`, `int4_sweep_block_m`); ``--int4-swap-max-m``
sets `SWAP_MAX_BLOCK_M` for every INT4 arm (16: the 64-row tile not transposed). Each entry:
microseconds a call and the relative error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "plugins" / "miles_fp8", ROOT / "plugins" / "miles_int4qat"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from miles_core.model import fused_moe  # noqa: E402
from miles_core.model.moe import expert_bounds  # noqa: E402


def _time_us(fn, device: torch.device) -> float:
    """Microseconds per call: replayed from a CUDA graph (`fused_moe_tune._time`), a plain loop on CPU."""
    if device.type == "cuda":
        from fused_moe_tune import _time

        return _time(fn, reps=10) * 1e3
    fn()
    t0 = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t0) / 2 * 1e6


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def _int4_sweeps(ns, kernels, run, ref: torch.Tensor, device: torch.device) -> dict:
    """The ``--int4-tiles`` / ``--int4-block-m`` timings (module settings restored after each)."""
    out: dict = {}

    def timed() -> dict:
        return {"us": round(_time_us(run, device), 1), "rel_err": round(_rel(run(), ref), 5)}

    keys = ("BLOCK_N", "num_warps", "num_stages", "BLOCK_K")
    tiles = [t.split(":") for t in ns.int4_tiles.split(",") if t]
    for name in ("GATE_UP", "DOWN"):
        if tiles:
            current, sweep = getattr(kernels, name), {}
            for tile in tiles:
                cfg = dict(current, **dict(zip(keys, map(int, tile))))
                setattr(kernels, name, cfg)
                sweep[":".join(str(cfg[k]) for k in keys)] = timed()
            setattr(kernels, name, current)
            out[f"int4_sweep_{name.lower()}"] = sweep
    if ns.int4_block_m:
        current, sweep = kernels.DECODE_BLOCK_M, {}
        for bm in (int(v) for v in ns.int4_block_m.split(",")):
            kernels.DECODE_BLOCK_M = bm
            sweep[str(bm)] = timed()
        kernels.DECODE_BLOCK_M = current
        out["int4_sweep_block_m"] = sweep
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the decode batch (copies: x top-k)")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768, help="expert FFN size")
    ap.add_argument(
        "--products", default="fp8,fp8acc,fp16,bf16", help="comma list of fp8, fp8acc, fp16, bf16"
    )
    ap.add_argument(
        "--fp8-down-decode-n", type=int, choices=[64, 128], default=None,
        help="BLOCK_N of the FP8 down kernel's transposed decode tile (triton_experts.DOWN_SWAPPED, 128)",
    )  # fmt: skip
    ap.add_argument("--int4-tiles", default="", help="INT4 settings, e.g. 64:4:3:128,128:8:3")
    ap.add_argument("--int4-block-m", default="", help="INT4 decode row blocks to time, e.g. 16,32,64")
    ap.add_argument("--int4-swap-max-m", type=int, default=None, help="INT4 SWAP_MAX_BLOCK_M")
    ns = ap.parse_args(argv)
    on_cuda = torch.cuda.is_available()
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("the expert kernels need CUDA (or TRITON_INTERPRET=1 for a smoke test on CPU)")
    bad = set(ns.products.split(",")) - {"fp8", "fp8acc", "fp16", "bf16"}
    if bad:
        ap.error(f"--products: unknown {sorted(bad)}; use a comma list of fp8, fp8acc, fp16, bf16")
    from miles_fp8 import triton_experts, triton_fp8
    from miles_fp8.quant import quantize

    if ns.fp8_down_decode_n:
        triton_experts.DOWN_SWAPPED["BLOCK_N"] = ns.fp8_down_decode_n
    from miles_int4qat import triton_experts as int4_kernels
    from miles_int4qat.packing import SCALE_DTYPE, quantize_pack

    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32  # the interpreter's bf16 dot is wrong
    e, h, i, k = ns.experts, ns.hidden, ns.inter, ns.topk
    g = torch.Generator(device=device).manual_seed(0)
    gate_up = (torch.randn(e, 2 * i, h, device=device, generator=g) * 0.02).to(dtype)
    down = (torch.randn(e, h, i, device=device, generator=g) * 0.02).to(dtype)
    x = torch.randn(ns.tokens, h, device=device, generator=g).to(dtype)
    idx = torch.rand(ns.tokens, e, device=device, generator=g).topk(k, dim=-1).indices.reshape(-1)
    order = idx.argsort(stable=True)
    src, bounds = (order // k).to(torch.int32), expert_bounds(idx, e)

    tile = (triton_fp8.BLOCK, triton_fp8.BLOCK)
    fp8 = [quantize(w.float(), tile) for w in (gate_up[:, :i], gate_up[:, i:], down)]
    fp8_args = tuple(q.contiguous() for q, _ in fp8) + tuple(s for _, s in fp8)
    # scales in bf16, as `Int4Experts` holds them (`packing.SCALE_DTYPE`)
    packed = [(p, s.to(SCALE_DTYPE)) for p, s in (quantize_pack(w.float(), 128) for w in (gate_up, down))]
    int4_args = (packed[0][0], packed[0][1], packed[1][0], packed[1][1], 128)

    name = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    result: dict = {
        "bench": "quant_experts", "device": name, "dtype": str(dtype).removeprefix("torch."),
        "tokens": ns.tokens, "experts": e, "topk": k, "hidden": h, "inter": i,
        "fp8_down_decode_n": triton_experts.DOWN_SWAPPED["BLOCK_N"],
        "bf16_bytes": (gate_up.numel() + down.numel()) * gate_up.element_size(),
        "fp8_bytes": sum(q.numel() + s.numel() * 4 for q, s in fp8),
        "int4_bytes": sum(p.numel() * 4 + s.numel() * s.element_size() for p, s in packed),
    }  # fmt: skip
    ref = fused_moe.fused_experts(x, src, bounds, gate_up, down).float()
    bf16 = lambda: fused_moe.fused_experts(x, src, bounds, gate_up, down)  # noqa: E731
    result["bf16_us"] = round(_time_us(bf16, device), 1)
    dev_index = torch.cuda.current_device() if on_cuda else None
    for products in ns.products.split(",") if on_cuda else ["fp32"]:
        if on_cuda:
            # forced: the products probe is skipped; the fused quantization pass is still probed
            result[f"fp8_{products}_preq"] = triton_fp8.force_mode(torch.device("cuda", dev_index), products)
        run = lambda: triton_experts.fp8_experts(x, src, bounds, *fp8_args)  # noqa: E731
        result[f"fp8_{products}_us"] = round(_time_us(run, device), 1)
        result[f"fp8_{products}_rel_err"] = round(_rel(run(), ref), 5)
    run = lambda: int4_kernels.int4_experts(x, src, bounds, *int4_args)  # noqa: E731
    if ns.int4_swap_max_m is not None:
        int4_kernels.SWAP_MAX_BLOCK_M = ns.int4_swap_max_m
    result["int4_swap_max_m"] = int4_kernels.SWAP_MAX_BLOCK_M
    result["int4_us"] = round(_time_us(run, device), 1)
    result["int4_rel_err"] = round(_rel(run(), ref), 5)
    result.update(_int4_sweeps(ns, int4_kernels, run, ref, device))
    for arm in [a.removesuffix("_us") for a in list(result) if a.endswith("_us")]:
        fmt = "bf16" if arm == "bf16" else arm.split("_")[0]
        result[f"{arm}_tb_s"] = round(result[f"{fmt}_bytes"] / result[f"{arm}_us"] / 1e6, 3)
        if arm != "bf16":
            result[f"{arm}_vs_bf16"] = round(result["bf16_us"] / result[f"{arm}_us"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
