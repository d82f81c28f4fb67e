"""The fused Triton quantization must equal `quant.quantize` bit for bit (GPU), and stay out of CPU runs."""

from __future__ import annotations

import pytest
import torch
from miles_fp8 import triton_quant
from miles_fp8.quant import RECIPES, quantize

ROWWISE, BLOCKWISE = RECIPES["rowwise"].act_tile, RECIPES["blockwise"].act_tile


def test_cpu_tensors_never_take_the_fused_kernel():
    x = torch.randn(4, 256)
    assert not triton_quant.supports(x, ROWWISE)
    assert triton_quant.quantize_rows(x, BLOCKWISE) is None
    q1, s1 = quantize(x, BLOCKWISE, fast=True)
    q2, s2 = quantize(x, BLOCKWISE)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_supports_only_per_row_tiles_of_2d_row_major_tensors():
    meta = torch.empty(8, 256, device="meta")  # shape/stride checks only; is_cuda is False on meta
    assert not triton_quant.supports(meta, ROWWISE)
    if torch.cuda.is_available():
        x = torch.randn(8, 256, device="cuda")
        assert triton_quant.supports(x, ROWWISE) and triton_quant.supports(x, BLOCKWISE)
        assert not triton_quant.supports(x, (128, 128)) and not triton_quant.supports(x, (0, 0))
        assert not triton_quant.supports(x.t(), ROWWISE) and not triton_quant.supports(x[None], ROWWISE)


def _awkward(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(m * 7 + k)
    x = torch.randn(m, k).pow(3) * 3  # heavy tails: many distinct scales
    x[0] = 0  # an all-zero row / tiles
    if m > 2:
        x[1, : min(k, 200)] = 1e30 if dtype == torch.float32 else 3e38  # saturating, crossing a tile edge
        x[2] = -0.0
    if m > 3:
        x[3] = x[3] * 1e-30  # tiny values: scales near the bottom of the fp32 range
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tile", [ROWWISE, BLOCKWISE], ids=["rowwise", "blockwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (64, 1000), (300, 4096), (33, 8192)])
def test_fused_kernel_is_bit_identical_to_quantize(tile, dtype, shape):
    x = _awkward(*shape, dtype)
    fused = triton_quant.quantize_rows(x.cuda(), tile)
    assert triton_quant.status() == "ok", triton_quant.status()
    assert fused is not None
    q_ref, s_ref = quantize(x, tile)  # the CPU reference (== the eager CUDA path, tested elsewhere)
    q, s = fused[0].cpu(), fused[1].cpu()
    assert s.shape == s_ref.shape and q.dtype == q_ref.dtype
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    q_eager, s_eager = quantize(x.cuda(), tile)  # fast=False: the eager CUDA path
    assert torch.equal(q_eager.cpu().view(torch.uint8), q.view(torch.uint8)) and torch.equal(s_eager.cpu(), s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_linear_gpu_forward_runs_on_the_fused_kernel():
    from miles_fp8.linear import Fp8Linear

    lin = torch.nn.Linear(256, 128, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    for recipe in ("rowwise", "blockwise"):
        before = _count_launches()
        Fp8Linear(lin, RECIPES[recipe], train=False)(x)
        assert _count_launches() > before, recipe
    assert triton_quant.status() == "ok"


def _count_launches() -> int:
    return triton_quant.launches
