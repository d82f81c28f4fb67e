"""The Triton log-prob/entropy kernels (`miles_core.train.logprob_kernel`, used by `--train-compile`)
give the chunked torch path's values and gradients: under Triton's interpreter on CPU (when triton is
installed) and on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miles_core.train.losses import log_probs_and_entropy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402


def check(device: str, dtype: torch.dtype, atol: float) -> None:
    from miles_core.train import logprob_kernel

    g = torch.Generator().manual_seed(0)
    n, v = 6, 5000  # several BLOCK_V slices, the last one partial
    base = 4 * torch.randn(n, v, generator=g)
    base[1] += 1000.0  # large logits: the entropy must keep its precision
    base[2, ::3] = float("-inf")  # masked vocabulary entries
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = 1  # a reachable target on the masked row
    for with_entropy, w_lp, w_ent in ((True, 2.0, 0.5), (True, 0.0, 1.0), (False, 1.0, 0.0)):
        outs = []
        for fused in (False, True):
            x = base.to(device=device, dtype=dtype).requires_grad_()
            assert logprob_kernel.available(x)
            lp, ent = log_probs_and_entropy(x * 1, targets.to(device), with_entropy=with_entropy, fused=fused)
            loss = w_lp * lp.sum() + (w_ent * ent.sum() if with_entropy else 0.0)
            loss.backward()
            outs.append((lp, ent, x.grad))
        (lp0, ent0, g0), (lp1, ent1, g1) = outs
        torch.testing.assert_close(lp1, lp0, atol=atol, rtol=0)
        if with_entropy:
            torch.testing.assert_close(ent1, ent0, atol=atol, rtol=0)
        assert g1.dtype == dtype
        torch.testing.assert_close(g1.float(), g0.float(), atol=atol, rtol=0)


@needs_interpreter
def test_kernels_match_under_the_triton_interpreter():
    code = "import torch, test_logprob_kernel as t; t.check('cpu', torch.float32, 1e-4); print('ok')"
    run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_on_cuda():
    check("cuda", torch.float32, 1e-4)
    check("cuda", torch.bfloat16, 2e-2)
