"""Rollout modules: packed INT4 only (no full-precision copy), exact dequant forward, re-packing at every
weight sync through `Engine.update_weights`, and the memory they hold."""

from __future__ import annotations

import copy

import pytest
import torch
from int4_helpers import tiny_moe
from miles_int4qat.fake_quant import fake_quant_values
from miles_int4qat.modules import (
    Int4Experts,
    Int4Linear,
    int4_bytes,
    quantize_for_rollout,
    scope_weight_numel,
)

from miles_core import UsageError
from miles_core.engine import Engine
from miles_core.model import named_hf_tensors


def _quantized_reference(model, group_size: int):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ref.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.copy_(fake_quant_values(p, group_size))
    return ref


def test_engine_model_holds_only_packed_int4_in_scope():
    model = tiny_moe(hidden=64, inter=64)
    numel = scope_weight_numel(model, "experts")
    names = quantize_for_rollout(model, "experts", 64)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for name in names:
        mod = model.get_submodule(name)
        assert isinstance(mod, Int4Experts)
        assert list(mod.parameters()) == []  # nothing trainable or full precision left behind
        held = dict(mod.named_buffers())
        assert {n: t.dtype for n, t in held.items() if "packed" in n} == dict.fromkeys(
            ("gate_up_packed", "down_packed"), torch.int32
        )
        assert sum(
            t.numel() for n, t in held.items() if "scale" in n
        ) * 64 == mod.gate_up_packed.numel() * 8 + (mod.down_packed.numel() * 8)
    assert not any(".experts." in n for n, _ in model.named_parameters())
    # bf16 scales at group 64: 0.5 + 2/64 bytes a weight against bf16's 2
    assert int4_bytes(model) == numel // 2 + numel // 64 * 2
    assert int4_bytes(model) * 3.5 <= 2 * numel


def test_int4_forward_equals_quantized_weights_and_sync_repacks():
    model = tiny_moe()
    engine_model = copy.deepcopy(model)
    quantize_for_rollout(engine_model, "experts", 16)
    ids = torch.randint(0, 64, (2, 8))
    ref = _quantized_reference(model, 16)
    torch.testing.assert_close(engine_model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)

    engine = Engine(engine_model, max_batch_size=4)
    with torch.no_grad():  # a "training step": new master weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = engine_model.model.layers[0].mlp.experts.gate_up_packed.clone()
    engine.update_weights(named_hf_tensors(model), version=1)
    assert engine.weight_version == 1
    assert not torch.equal(before, engine_model.model.layers[0].mlp.experts.gate_up_packed)
    torch.testing.assert_close(
        engine_model(ids).logits, _quantized_reference(model, 16)(ids).logits, rtol=0, atol=1e-5
    )
    outs = engine.generate_batch([[1, 2, 3], [4, 5]], {"temperature": 1.0, "max_new_tokens": 4})
    assert all(len(o.output_ids) == 4 and len(o.log_probs) == 4 for o in outs)


def test_all_linear_scope_and_fused_expert_names():
    model = tiny_moe()
    engine_model = copy.deepcopy(model)
    names = quantize_for_rollout(engine_model, "all-linear", 16)
    assert isinstance(engine_model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert "lm_head" not in names and not any(n.endswith("mlp.gate") for n in names)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    engine = Engine(engine_model, max_batch_size=2)
    engine.update_weights(named_hf_tensors(model, fused_experts=True), version=3)
    w = engine_model.model.layers[1].self_attn.o_proj
    expected = fake_quant_values(model.model.layers[1].self_attn.o_proj.weight, 16)
    torch.testing.assert_close(w.kernel.dequant(w.weight_packed, w.weight_scale), expected, rtol=0, atol=0)


def test_wrong_tensor_for_int4_module_fails_clearly():
    model = tiny_moe()
    quantize_for_rollout(model, "experts", 16)
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(UsageError, match="matches none of its 8 experts"):
        experts.weight_loader("9.gate_proj.weight", torch.zeros(32, 32))
    with pytest.raises(UsageError, match="does not divide the input dimension 32"):
        quantize_for_rollout(tiny_moe(), "experts", 128)
