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


BLOCKS_CHECK = """
import torch
from miles_fp8 import triton_blocks
from miles_fp8.quant import quantize

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
w = torch.randn(3, 300, 400, generator=g).pow(3)
w[0, :128, :128] = 0  # an all-zero block: scale 1
w[1, 5, :130] = 1e30  # saturating, across a block edge
w[2, 7:9] *= 1e-30  # tiny values, some encode to -0
for dtype in (torch.float32, torch.bfloat16):
    x = w.to(dtype)[:, :, 10:210]  # strided; partial blocks in both dims
    for t in (x, x[1], x[:, :100, :100]):
        (q1, s1), (q2, s2) = triton_blocks.launch(t), quantize(t, (128, 128))
        assert q1.shape == q2.shape and s1.shape == s2.shape and torch.equal(s1, s2), (dtype, t.shape)
        assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)), (dtype, t.shape)
print("ok")
"""


def test_block_kernel_equals_quantize_bit_for_bit_under_the_interpreter():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root.parents[1] / "tests"))
    from triton_interp import interpreter_usable, run_interpreted

    if not interpreter_usable():
        pytest.skip("needs triton >= 3.7 (or numpy < 2.3 for an older one's interpreter)")
    run_interpreted(f"import sys\nsys.path.insert(0, {str(root)!r})\n" + BLOCKS_CHECK)


def test_cpu_and_non_block_tiles_never_take_the_block_kernel():
    from miles_fp8 import triton_blocks

    assert triton_blocks.quantize_blocks(torch.randn(2, 256, 256), (128, 128)) is None
    meta = torch.empty(2, 256, 256, device="meta")
    assert not triton_blocks.supports(meta, (128, 128))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_kernel_is_bit_identical_to_quantize_on_cuda(dtype):
    """The training forward's weight quantization (`quantize(w, (128, 128), fast=True)`) on the fused
    kernel: the eager CUDA path's and the CPU's codes and scales, on the 30B-A3B expert shape (a strided
    gate view of the fused gate/up weight) and awkward values."""
    from miles_fp8 import triton_blocks

    torch.manual_seed(0)
    gate_up = torch.randn(8, 2 * 768, 2048, device="cuda").pow(3).to(dtype)
    gate_up[0, :128, :128] = 0
    gate_up[1, 3, :200] = 3e38 if dtype == torch.bfloat16 else 1e30
    for w in (gate_up[:, :768], gate_up[:, 768:], gate_up[2, :300, :1000], _awkward(70, 200, dtype).cuda()):
        fused = quantize(w, (128, 128), fast=True)
        assert triton_blocks._state.get(torch.cuda.current_device()) == "ok", triton_blocks._state
        for q_ref, s_ref in (quantize(w, (128, 128)), quantize(w.cpu(), (128, 128))):
            assert torch.equal(fused[1].cpu(), s_ref.cpu())
            assert torch.equal(fused[0].cpu().view(torch.uint8), q_ref.cpu().view(torch.uint8))
