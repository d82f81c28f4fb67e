"""Quantize -> dequantize against hand-made blocks: zeros, saturation, partial blocks, NaN/Inf, bounds."""

from __future__ import annotations

import pytest
import torch
from miles_fp8.quant import FP8_DTYPE, FP8_MAX, RECIPES, dequantize, fake_quant, get_recipe, quantize

from miles_core import UsageError

W, A = RECIPES["blockwise"].weight_tile, RECIPES["blockwise"].act_tile


def test_all_zero_block_encodes_zeros_with_unit_scale_and_leaves_neighbours_alone():
    x = torch.zeros(128, 256)
    x[:, 128:] = torch.linspace(-3, 3, 128 * 128).view(128, 128)
    q, s = quantize(x, W)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and s.shape == (1, 2)
    assert s[0, 0] == 1.0 and torch.all(q[:, :128].float() == 0)
    assert torch.allclose(s[0, 1], torch.tensor(3.0 / FP8_MAX))
    assert torch.all(dequantize(q, s, W)[:, :128] == 0)


def test_block_max_maps_to_448_and_huge_values_saturate_without_nan():
    x = torch.full((128, 128), 0.5)
    x[3, 7], x[100, 2] = 1e6, -1e6  # far beyond e4m3's range: the scale absorbs them
    q, s = quantize(x, W)
    qf = q.float()
    assert not torch.isnan(qf).any()
    assert qf.abs().max() == FP8_MAX and qf[3, 7] == FP8_MAX and qf[100, 2] == -FP8_MAX
    assert torch.isclose(dequantize(q, s, W)[3, 7], torch.tensor(1e6), rtol=1e-6)
    # 0.5 is ~2e-6 of the block max: below e4m3's smallest subnormal relative to 448, so it underflows
    assert qf[0, 0] == 0


def test_values_already_on_the_e4m3_grid_round_trip_exactly():
    grid = torch.tensor([448.0, -448.0, 1.0, -0.5, 0.875, 2**-9, 0.0, 240.0])  # all representable
    x = grid.repeat(128, 16)  # [128, 128]
    q, s = quantize(x, W)
    assert s.item() == 1.0  # amax 448 -> scale exactly 1
    assert torch.equal(dequantize(q, s, W), x)


def test_blocks_are_independent_an_outlier_only_coarsens_its_own_block():
    x = torch.randn(256, 256)
    y = x.clone()
    y[0, 0] = 1e6  # outlier in block (0, 0): its neighbours drop into subnormals
    err_x, err_y = fake_quant(x, W) - x, fake_quant(y, W) - y
    assert torch.equal(err_x[128:], err_y[128:]) and torch.equal(err_x[:, 128:], err_y[:, 128:])
    assert err_y[1:128, 1:128].abs().mean() > 10 * err_x[1:128, 1:128].abs().mean()


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("shape", [(200, 300), (96, 96), (3, 5, 130)])
def test_error_bound_and_scale_shapes_with_partial_blocks(recipe, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.logspace(-2, 2, shape[-1])  # columns of very different magnitude
    for tile in (RECIPES[recipe].weight_tile, RECIPES[recipe].act_tile):
        q, s = quantize(x, tile)
        rows, cols = shape[-2], shape[-1]
        tr, tc = tile[0] or rows, tile[1] or cols
        assert q.shape == x.shape and s.shape == (*shape[:-2], -(-rows // tr), -(-cols // tc))
        d = dequantize(q, s, tile)
        smax = s.max()
        # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals; subnormal step is 2^-9 * scale
        bound = torch.maximum(x.abs() * 2**-4, smax * 2**-10) * (1 + 1e-6)
        assert torch.all((d - x).abs() <= bound)
        assert (d - x).abs().max() > 0  # it did quantize


def test_batched_expert_weights_quantize_like_each_expert_alone():
    w = torch.randn(4, 96, 200)
    q, s = quantize(w, W)
    for e in range(4):
        qe, se = quantize(w[e], W)
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s[e], se)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_rejected_with_the_tensor_name(bad):
    x = torch.ones(4, 4)
    x[2, 1] = bad
    with pytest.raises(UsageError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*NaN/Inf"):
        quantize(x, W, name="model.layers.0.self_attn.q_proj.weight")


def test_unknown_recipe_is_a_usage_error():
    assert get_recipe("rowwise").act_tile == (1, 0)
    with pytest.raises(UsageError, match="--fp8-recipe"):
        get_recipe("mxfp8")


def test_activation_tiles_are_per_token_so_batching_does_not_change_a_row():
    torch.manual_seed(1)
    x = torch.randn(10, 300)
    full = fake_quant(x, A)
    for i in range(10):
        assert torch.equal(fake_quant(x[i : i + 1], A), full[i : i + 1])
