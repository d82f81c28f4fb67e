"""SwiGLU's one-pass backward (`miles_core.model.swiglu`), plain and with per-row weights = autograd of
silu(gate) * up (* w): the torch
maths on CPU, the Triton kernel under Triton's interpreter (when triton is installed) and on CUDA,
and inside a compiled function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miles_core.model.swiglu import swiglu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402


def check(device: str, dtype: torch.dtype, atol: float, compiled: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    for rows, inter in ((7, 48), (33, 1100)):  # the second: two column blocks, the last partial
        h = (3 * torch.randn(rows, 2 * inter, generator=g)).to(device=device, dtype=dtype)
        go = torch.randn(rows, inter, generator=g).to(device=device, dtype=dtype)
        w = torch.rand(rows, generator=g).to(device=device, dtype=dtype)
        for weighted in (False, True):
            ref_h, ref_w = h.double().requires_grad_(), w.double().requires_grad_()
            gate, up = ref_h.chunk(2, dim=-1)
            want = F.silu(gate) * up * (ref_w[:, None] if weighted else 1)
            want.backward(go.double())
            ours_h, ours_w = h.clone().requires_grad_(), w.clone().requires_grad_()
            fn = torch.compile(swiglu) if compiled else swiglu
            out = fn(ours_h, ours_w if weighted else None)
            out.backward(go)
            torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
            assert ours_h.grad.dtype == dtype
            torch.testing.assert_close(ours_h.grad.double(), ref_h.grad, atol=atol, rtol=atol)
            if weighted:  # a sum over the row: its error grows with the row's length
                assert ours_w.grad.dtype == dtype
                torch.testing.assert_close(ours_w.grad.double(), ref_w.grad, atol=atol * 30, rtol=atol)


def test_backward_matches_autograd_on_cpu():
    check("cpu", torch.float32, 1e-5)


def test_backward_inside_a_compiled_function():
    check("cpu", torch.float32, 1e-5, compiled=True)


@needs_interpreter
def test_kernel_matches_under_the_triton_interpreter():
    code = "import torch, test_swiglu as t; t.check('cpu', torch.float32, 1e-5); print('ok')"
    run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_cuda():
    check("cuda", torch.float32, 1e-5)
    check("cuda", torch.bfloat16, 3e-2)
    check("cuda", torch.bfloat16, 3e-2, compiled=True)
