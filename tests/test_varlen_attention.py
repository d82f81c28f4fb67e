"""Causal packed-sequence attention in Triton (`miles_core.model.varlen_attention`): output and
q/k/v gradients against per-sequence attention in float64, with grouped-query heads, sequences that
end mid-block, length-1 sequences and several blocks per sequence. Under Triton's interpreter on CPU
(when triton is installed) and on CUDA, also inside a compiled function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402


def reference(q, k, v, lens):
    """Per-sequence causal SDPA in float64, K/V repeated per query head."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        qs, ks, vs = (x[sl].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def check(device, dtype, atol, lens=(5, 17, 1, 40, 33), heads=(4, 2), dim=16, blocks=None, compiled=False):
    from miles_core.model import varlen_attention as va

    if blocks:  # small blocks so that short test sequences span several of them
        for cfg, (bm, bn) in zip((va.FWD, va.BWD_KV, va.BWD_Q), blocks):
            cfg.update(BLOCK_M=bm, BLOCK_N=bn)
    g = torch.Generator().manual_seed(0)
    t = sum(lens)
    q = torch.randn(t, heads[0], dim, generator=g)
    k = torch.randn(t, heads[1], dim, generator=g)
    v = torch.randn(t, heads[1], dim, generator=g)
    go = torch.randn(t, heads[0], dim, generator=g)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = reference(*ref, lens)
    want.backward(go.double())
    ours = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    fn = va.VarlenAttention.apply
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    out = fn(*ours, cu, max(lens))
    out.backward(go.to(device=device, dtype=dtype))
    torch.testing.assert_close(out.double().cpu(), want, atol=atol, rtol=atol)
    for mine, theirs in zip(ours, ref):
        assert mine.grad.dtype == dtype
        torch.testing.assert_close(mine.grad.double().cpu(), theirs.grad, atol=atol, rtol=atol)


@needs_interpreter
def test_kernels_under_the_triton_interpreter():
    uneven = "blocks=((16, 16), (8, 32), (32, 8))"
    code = (
        "import torch, test_varlen_attention as t\n"
        "t.check('cpu', torch.float32, 1e-4, blocks=((16, 8), (8, 16), (16, 8)))\n"  # several blocks
        "t.check('cpu', torch.float32, 1e-4, lens=(3, 20), heads=(2, 2), blocks=((16, 16),) * 3)\n"
        f"t.check('cpu', torch.float32, 1e-4, lens=(3, 20, 7), heads=(4, 1), {uneven})\n"
        "print('ok')"
    )
    run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda():
    long = (383, 1, 130, 257, 64, 500)  # several default-sized blocks, partial last blocks
    check("cuda", torch.float32, 2e-3, lens=long, heads=(16, 4), dim=64)
    check("cuda", torch.bfloat16, 3e-2, lens=long, heads=(16, 4), dim=64)
    check("cuda", torch.bfloat16, 3e-2, lens=long, heads=(8, 8), dim=128, compiled=True)
