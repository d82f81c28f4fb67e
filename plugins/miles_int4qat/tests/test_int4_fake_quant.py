"""Fake quantization for training: forward values, straight-through gradient, shared master Parameters."""

from __future__ import annotations

import copy

import torch
from int4_helpers import tiny_moe
from miles_int4qat.fake_quant import FakeQuantExperts, FakeQuantLinear, fake_quant, fake_quant_values
from miles_int4qat.modules import fake_quantize_for_training
from miles_int4qat.packing import dequantize, quantize_pack


def test_forward_is_the_int4_grid_and_gradient_is_straight_through():
    w = torch.randn(4, 64, requires_grad=True)
    y = fake_quant(w, 16)
    packed, scale = quantize_pack(w.detach(), 16)
    assert torch.equal(y.detach(), dequantize(packed, scale, 16))
    assert not torch.equal(y.detach(), w.detach())
    upstream = torch.randn(4, 64)
    (y * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_swap_keeps_the_same_parameters_and_trains_them():
    model = tiny_moe()
    before = {n: p for n, p in model.named_parameters()}
    names = fake_quantize_for_training(model, "all-linear", 16)
    assert "model.layers.0.mlp.experts" in names and "model.layers.0.self_attn.q_proj" in names
    assert "lm_head" not in names and "model.layers.0.mlp.gate" not in names
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert isinstance(model.model.layers[0].mlp.experts, FakeQuantExperts)
    assert isinstance(model.model.layers[1].self_attn.o_proj, FakeQuantLinear)
    ids = torch.randint(0, 64, (2, 7))
    model(ids).logits.logsumexp(-1).sum().backward()
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.abs().sum() > 0


def test_fake_quant_model_equals_the_model_with_quantized_weights():
    model = tiny_moe()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            e = layer.mlp.experts
            e.gate_up_proj.copy_(fake_quant_values(e.gate_up_proj, 16))
            e.down_proj.copy_(fake_quant_values(e.down_proj, 16))
    fake_quantize_for_training(model, "experts", 16)
    ids = torch.randint(0, 64, (3, 9))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
