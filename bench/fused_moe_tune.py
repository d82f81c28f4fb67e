"""Tile and launch settings of the Triton decode expert kernels (`miles_core.model.fused_moe`), timed.

For the rollout bench's 0.7B MoE layer (32 experts, hidden 1024, expert FFN 512, top-4, bf16) at a decode
batch (`--batch`, default 64: 256 token copies), times each kernel of `fused_experts` under every
setting in a small grid (CUDA graph of 20 calls, so launch overhead is out), and the grouped GEMMs
(`torch._grouped_mm`) of the same layer for comparison. Prints one JSON line with the best setting per
kernel (timed together with the other kernel at its current setting) and the current pair's effective
bandwidth (expert weight bytes streamed / time); the winners go into
`fused_moe.GATE_UP` / `fused_moe.DOWN` by hand.

    python bench/fused_moe_tune.py [--batch 64]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from miles_core.model import Experts, set_fused_moe
from miles_core.model import fused_moe as fm


def _time(fn, reps: int = 20) -> float:
    """ms per call of fn, replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (5 * reps)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args(argv)
    e, h, i, k = 32, 1024, 512, 4
    torch.manual_seed(0)
    experts = Experts(e, h, i).cuda().to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    x = torch.randn(a.batch, h, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(e, device="cuda")[:k] for _ in range(a.batch)])
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    bounds = torch.zeros(e + 1, dtype=torch.int32, device="cuda")
    bounds[1:] = torch.searchsorted(flat[order], torch.arange(1, e + 1, device="cuda")).to(torch.int32)
    src = (order // k).to(torch.int32)
    used = int((torch.bincount(flat, minlength=e) > 0).sum())
    gate_up_bytes = used * 2 * i * h * 2
    down_bytes = used * h * i * 2
    grid = [
        {"BLOCK_N": n, "BLOCK_K": kk, "num_warps": nw, "num_stages": ns}
        for n, kk, nw, ns in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4))
    ]
    saved = dict(fm.GATE_UP), dict(fm.DOWN)
    ref = fm.fused_experts(x, src, bounds, experts.gate_up_proj, experts.down_proj)
    results = {"gate_up": [], "down": []}
    with torch.no_grad():
        for which in ("gate_up", "down"):
            for cfg in grid:
                fm.GATE_UP.clear(), fm.GATE_UP.update(saved[0])
                fm.DOWN.clear(), fm.DOWN.update(saved[1])
                (fm.GATE_UP if which == "gate_up" else fm.DOWN).update(cfg)
                try:
                    out = fm.fused_experts(x, src, bounds, experts.gate_up_proj, experts.down_proj)
                    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
                    ms = _time(lambda: fm.fused_experts(x, src, bounds, experts.gate_up_proj,
                                                        experts.down_proj))  # fmt: skip
                except Exception as exc:  # a setting the compiler refuses (shared memory, registers)
                    results[which].append((cfg, None, type(exc).__name__))
                    continue
                results[which].append((cfg, ms, None))
        fm.GATE_UP.clear(), fm.GATE_UP.update(saved[0])
        fm.DOWN.clear(), fm.DOWN.update(saved[1])
        both_ms = _time(lambda: fm.fused_experts(x, src, bounds, experts.gate_up_proj, experts.down_proj))
        xs = x[order // k]
        offs = bounds[1:]
        grouped_ms = _time(lambda: experts._grouped(xs, offs, torch.bfloat16))
        set_fused_moe(experts, 0)
    out = {"device": torch.cuda.get_device_name(), "batch": a.batch, "experts_used": used,
           "current_ms": round(both_ms, 4), "grouped_mm_ms": round(grouped_ms, 4)}  # fmt: skip
    # Each arm times both kernels; the other kernel's share is the same in every arm of a sweep.
    for which in ("gate_up", "down"):
        ok = sorted((r for r in results[which] if r[1] is not None), key=lambda r: r[1])
        best = ok[0]
        out[f"{which}_best"] = best[0]
        out[f"{which}_best_pair_ms"] = round(best[1], 4)
        out[f"{which}_top5"] = [[r[0], round(r[1], 4)] for r in ok[:5]]
        out[f"{which}_failed"] = sum(r[1] is None for r in results[which])
    out["weight_gb"] = round((gate_up_bytes + down_bytes) / 1e9, 3)
    out["current_tb_s"] = round((gate_up_bytes + down_bytes) / (both_ms * 1e-3) / 1e12, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
