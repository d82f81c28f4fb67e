"""Packing: exact pack/unpack round trip, the compressed-tensors bit layout, the quantization formula and
the group-size errors."""

from __future__ import annotations

import pytest
import torch
from miles_int4qat.packing import (
    check_group_size,
    dequantize,
    group_scales,
    pack_int4,
    quantize,
    quantize_pack,
    unpack_int4,
)

from miles_core import UsageError


@pytest.mark.parametrize("shape", [(8,), (4, 64), (3, 5, 128)])
def test_pack_unpack_round_trips_exactly(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_int4(packed), q)


def test_bit_layout_is_value_i_at_bits_4i_offset_by_8():
    q = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed[0].item() == 0x76543210
    assert packed[1].item() == torch.tensor(0xFEDCBA98).to(torch.int32).item()  # wraps to a negative int32


def test_quantize_follows_the_formula():
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))
    w[0, :32] = 0.0  # an all-zero group takes the 1e-5 floor
    q, scale = quantize(w, 32)
    g = w.view(6, 2, 32)
    ref_scale = torch.clamp(g.abs().amax(-1) / 7, min=1e-5).bfloat16().float()  # held in bf16
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(6, 2, 32).float(), torch.clamp(torch.round(g / ref_scale[..., None]), -7, 7))
    assert scale[0, 0].item() == pytest.approx(1e-5, rel=4e-3)
    assert q.abs().max() == 7
    packed, s = quantize_pack(w, 32)
    assert torch.equal(dequantize(packed, s, 32), (q.view(6, 2, 32) * ref_scale[..., None]).view(6, 64))
    assert (dequantize(packed, s, 32) - w).abs().max() <= ref_scale.max() / 2 + 1e-7


def test_group_size_that_does_not_divide_fails_clearly():
    with pytest.raises(
        UsageError, match=r"--int4-group-size 128 does not divide the input dimension 96 of x"
    ):
        check_group_size(96, 128, "x")
    with pytest.raises(UsageError, match="e.g. 32"):
        group_scales(torch.zeros(4, 96), 128)
    with pytest.raises(UsageError, match="positive multiple of 8"):
        check_group_size(96, 12)
    check_group_size(96, 32)  # divides: no error
