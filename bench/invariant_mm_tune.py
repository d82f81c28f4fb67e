"""Benchmark: the batch-invariant matmul candidates of --true-on-policy-mode against torch, per shape.

Every nn.Linear of the mode and its experts run through `invariant_kernels` with tiles picked by shape
among `invariant_tiles.CANDIDATES` (all of one family give a row the same bits; the per-card probe keeps
them or the reference alone). This times, on the ~0.7B bench config (hidden 1024, 16 query / 4 KV heads
of 64, 32 experts top-4, expert FFN 512, vocab 32000) at a decode step of 64 rows (``--decode-rows``) and
a packed training micro-batch (``--train-rows``, 16384 = 64 samples x 256 tokens): each linear shape
(q/o 1024x1024, k/v 256x1024, router 32x1024, LM head 32000x1024) and the two expert kernels, under every
candidate the probe kept, under the one `select` picks, and torch's peer (F.linear on cuBLAS; the experts'
bf16 `torch._grouped_mm` of the backward's reference). Each arm is replayed from a CUDA graph.

One JSON line: the kept candidates; per shape microseconds of each candidate (``us``), the picked one
and torch's, and the fastest; per phase the model's totals (shapes weighted by their count in 12 layers,
LM head once) for the picked tiles, the fastest per shape, the reference alone and torch. Pick the rules
(`invariant_tiles.RULES`) from ``fastest``.

    python bench/invariant_mm_tune.py [--decode-rows 64] [--train-rows 16384]

On CPU it needs ``TRITON_INTERPRET=1`` and ``--tiny`` (fp32, small shapes): a smoke test of the script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from miles_core.model import invariant_kernels as ik  # noqa: E402
from miles_core.model import invariant_tiles as tiles  # noqa: E402

LAYERS = 12
# name: (N, K, count in the model); the experts: (experts, top-k, hidden, expert FFN)
LINEARS = {"q_o": (1024, 1024, 2 * LAYERS), "k_v": (256, 1024, 2 * LAYERS), "router": (32, 1024, LAYERS),
           "lm_head": (32000, 1024, 1)}  # fmt: skip
EXPERTS = (32, 4, 1024, 512)
TINY_LINEARS = {"q_o": (72, 40, 2), "router": (8, 40, 1), "lm_head": (136, 40, 1)}
TINY_EXPERTS = (4, 2, 40, 72)


def _time_us(fn, device: torch.device) -> float:
    """Microseconds per call: replayed from a CUDA graph (`fused_moe_tune._time`), a plain loop on CPU."""
    if device.type == "cuda":
        from fused_moe_tune import _time

        return _time(fn, reps=10) * 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _arms(kept: tuple[str, ...], fam: str, run, torch_fn, device) -> dict:
    """Microseconds of ``run(cfg)`` per kept candidate, of ``run(None)`` (the picked one) and of torch."""
    us = {name: _time_us(lambda c=tiles.CANDIDATES[fam][name]: run(c), device) for name in kept}
    picked, peer = _time_us(lambda: run(None), device), _time_us(torch_fn, device)
    return {"us": {k: round(v, 1) for k, v in us.items()}, "picked_us": round(picked, 1),
            "torch_us": round(peer, 1), "fastest": min(us, key=us.get)}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-rows", type=int, default=64)
    ap.add_argument("--train-rows", type=int, default=16384)
    ap.add_argument("--tiny", action="store_true", help="small fp32 shapes (CPU under TRITON_INTERPRET=1)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (a.tiny and ik.available(torch.empty(0))):
        ap.error("on CPU run it with TRITON_INTERPRET=1 and --tiny (a smoke test, not a measurement)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    linears, (e, topk, hidden, inter) = (TINY_LINEARS, TINY_EXPERTS) if a.tiny else (LINEARS, EXPERTS)
    fam, g = tiles.family(dtype), torch.Generator(device=device).manual_seed(0)
    kept = ik._kept(torch.empty(0, device=device, dtype=dtype))  # the probe runs here, eagerly
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = {"bench": "invariant_mm_tune", "device": name,
           "dtype": str(dtype).removeprefix("torch."), "family": fam, "kept": list(kept),
           "reference": tiles.reference(fam), "shapes": [], "totals": {}}  # fmt: skip
    for phase, m in (("decode", a.decode_rows), ("train", a.train_rows)):
        tot = dict.fromkeys(("picked_us", "fastest_us", "reference_us", "torch_us"), 0.0)
        for name, (n, k, count) in linears.items():
            x = torch.randn(m, k, device=device, generator=g).to(dtype)
            w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
            run = lambda c, x=x, w=w: ik._linear_fwd(x, w, c)  # noqa: E731
            r = _arms(kept, fam, run, lambda x=x, w=w: F.linear(x, w), device)
            picked = tiles.select(m, n, fam, kept)
            r = {"op": name, "phase": phase, "m": m, "n": n, "k": k, "picked": _name(fam, picked), **r}
            _add(tot, r, count, tiles.reference(fam))
            out["shapes"].append(r)
        case = tiles._expert_case(m, hidden, inter, e, topk, device, dtype, g, spare_last=False)
        run = lambda c, case=case: ik._experts_fwd(*case, cfg=c)  # noqa: E731
        r = _arms(kept, fam, run, lambda case=case: ik._experts_ref(*case), device)
        picks = [_name(fam, tiles.select(m * topk / e, n, fam, kept, kind)) for n, kind in
                 ((inter, "gate_up"), (hidden, "down"))]  # fmt: skip
        r = {"op": "experts", "phase": phase, "m": m * topk, "n": [2 * inter, hidden], "k": [hidden, inter],
             "picked": picks, **r}  # fmt: skip
        _add(tot, r, LAYERS, tiles.reference(fam))
        out["shapes"].append(r)
        out["totals"][phase] = {k: round(v, 1) for k, v in tot.items()}
        out["totals"][phase]["picked_vs_torch"] = round(tot["picked_us"] / tot["torch_us"], 3)
    print(json.dumps(out))
    return out


def _name(fam: str, cfg: dict) -> str:
    return next(n for n, c in tiles.CANDIDATES[fam].items() if c is cfg)


def _add(tot: dict, r: dict, count: int, ref: str) -> None:
    tot["picked_us"] += count * r["picked_us"]
    tot["fastest_us"] += count * r["us"][r["fastest"]]
    tot["reference_us"] += count * r["us"][ref]
    tot["torch_us"] += count * r["torch_us"]


if __name__ == "__main__":
    main()
