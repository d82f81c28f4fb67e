"""Benchmark: the true on-policy mode's attention forward + backward in a training step, three ways.

On the ~0.7B bench config's attention (16 query / 4 KV heads of 64) over a packed micro-batch of
``--seqs`` sequences of ``--len`` tokens (the mode runs equal-length sequences as one ``[G, H, T, D]``
call, queries at 0..T-1), bf16, per layer call of forward + backward:

- ``triton``: `invariant_kernels.attention` (Triton forward keeping the row log-sum-exp, Triton
  backward of `invariant_attn_grad`), what the mode runs;
- ``torch_grad``: the same Triton forward, backward by recomputing it in torch (masked SDPA over repeated
  K/V) and differentiating that (`invariant_kernels._TorchGrad`), what the mode ran before;
- ``sdpa``: normal mode's peer, causal SDPA over repeated K/V (flash attention on CUDA).

One JSON line: ms per call of each, ``*_x_12_layers`` totals, the speed-up over ``torch_grad``, the ratio
to ``sdpa``, and the largest gradient difference between ``triton`` and ``torch_grad`` relative to the
largest gradient. Timed with CUDA events over ``--reps`` calls after a warm-up.

    python bench/invariant_attn_grad.py [--seqs 64] [--len 256]

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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from miles_core.model import invariant_kernels as ik  # noqa: E402

LAYERS = 12


def _arms(rep: int) -> dict:
    def triton_arm(q, k, v, pos):
        return ik.attention(q, k, v, pos)

    def torch_grad(q, k, v, pos):
        return ik._TorchGrad.apply(ik._attention_fwd, ik._attention_ref, q, k, v, pos)

    def sdpa(q, k, v, pos):
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    return {"triton": triton_arm, "torch_grad": torch_grad, "sdpa": sdpa}


def _step(fn, xs, pos, do):
    for x in xs:
        x.grad = None
    fn(*xs, pos).backward(do)
    return [x.grad for x in xs]


def _time_ms(fn, xs, pos, do, reps: int) -> float:
    _step(fn, xs, pos, do)
    if xs[0].is_cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            _step(fn, xs, pos, do)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        _step(fn, xs, pos, do)
    return (time.perf_counter() - t0) * 1e3 / reps


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=64, help="sequences of one length in a micro-batch (G)")
    ap.add_argument("--len", type=int, default=256, help="tokens a sequence (T)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: fp32, 2 x 40 tokens, 4/2 heads of 16")
    a = ap.parse_args(argv)
    if a.tiny:
        a.seqs, a.len, a.heads, a.kv_heads, a.head_dim, a.reps = 2, 40, 4, 2, 16, 1
        dev, dtype = torch.device("cpu"), torch.float32
    elif torch.cuda.is_available():
        dev, dtype = torch.device("cuda"), torch.bfloat16
    else:
        raise SystemExit("needs a CUDA device; on CPU run it with TRITON_INTERPRET=1 and --tiny.")
    if not ik.available(torch.empty(0, device=dev)):
        raise SystemExit("the Triton kernels do not run here: install triton (CPU: TRITON_INTERPRET=1).")
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (a.seqs, a.heads, a.len, a.head_dim)
    kv = (a.seqs, a.kv_heads, a.len, a.head_dim)
    xs = [torch.randn(s, device=dev, generator=g).to(dtype).requires_grad_() for s in (shape, kv, kv)]
    do = torch.randn(shape, device=dev, generator=g).to(dtype)
    pos = torch.arange(a.len, device=dev).expand(a.seqs, a.len)
    arms = _arms(a.heads // a.kv_heads)
    ref = [x.clone() for x in _step(arms["torch_grad"], xs, pos, do)]
    got = _step(arms["triton"], xs, pos, do)
    rel = max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(got, ref))
    ms = {name: _time_ms(fn, xs, pos, do, a.reps) for name, fn in arms.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out = {
        "bench": "invariant_attn_grad", "device": name,
        "dtype": str(dtype).removeprefix("torch."), "shape": {"G": a.seqs, "H": a.heads, "Hkv": a.kv_heads,
        "T": a.len, "D": a.head_dim}, "fwd_bwd_ms": {k: round(v, 4) for k, v in ms.items()},
        **{f"{k}_x_{LAYERS}_layers_ms": round(v * LAYERS, 3) for k, v in ms.items()},
        "speedup_vs_torch_grad": round(ms["torch_grad"] / ms["triton"], 3),
        "triton_vs_sdpa": round(ms["triton"] / ms["sdpa"], 3), "grad_rel_diff_vs_torch_grad": rel,
    }  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
