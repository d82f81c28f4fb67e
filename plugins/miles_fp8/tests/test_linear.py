"""Fp8Linear / Fp8Experts: rollout and training modes agree bitwise, STE gradients, weight sync, swapping."""

from __future__ import annotations

import copy

import pytest
import torch
from fp8_helpers import tiny_moe
from miles_fp8.linear import Fp8Experts, Fp8Linear, convert_model, fp8_mm, is_high_precision
from miles_fp8.quant import RECIPES, fake_quant, quantize

from miles_core import UsageError
from miles_core.model import Experts, load_hf_tensors, named_hf_tensors

BLOCKWISE = RECIPES["blockwise"]


def _linear(seed: int = 0, k: int = 200, n: int = 96) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=True)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_rollout_and_train_modes_give_identical_outputs_close_to_fp32(recipe):
    lin = _linear()
    roll = Fp8Linear(copy.deepcopy(lin), RECIPES[recipe], train=False, name="l")
    train = Fp8Linear(copy.deepcopy(lin), RECIPES[recipe], train=True, name="l")
    x = torch.randn(3, 7, 200)
    y_roll, y_train = roll(x), train(x)
    assert torch.equal(y_roll, y_train)
    ref = lin(x)
    rel = float((y_train - ref).norm() / ref.norm())
    assert 1e-3 < rel < 0.08  # quantized (not a no-op), but only by FP8 rounding
    want = {"blockwise": (1, 2), "rowwise": (96, 1), "tensorwise": (1, 1)}[recipe]  # 96 x 200 weight
    assert roll.weight.dtype == torch.float8_e4m3fn and roll.weight_scale_inv.shape == want
    assert train.weight is not None and isinstance(train.weight, torch.nn.Parameter)


def test_train_mode_backward_is_straight_through_to_the_master_weight():
    lin = _linear(1)
    mod = Fp8Linear(lin, BLOCKWISE, train=True, name="l")
    x = torch.randn(5, 200, requires_grad=True)
    g = torch.randn(5, 96)
    (mod(x) * g).sum().backward()
    xq, wq = (
        fake_quant(x.detach(), BLOCKWISE.act_tile),
        fake_quant(lin.weight.detach(), BLOCKWISE.weight_tile),
    )
    assert torch.allclose(lin.weight.grad, g.t() @ xq, atol=1e-5)
    assert torch.allclose(x.grad, g @ wq, atol=1e-5)
    assert torch.allclose(lin.bias.grad, g.sum(0), atol=1e-5)


def test_weight_loader_requantizes_and_rejects_nan_naming_the_tensor():
    mod = Fp8Linear(_linear(0), BLOCKWISE, train=False, name="model.layers.1.self_attn.o_proj")
    new = _linear(5)
    mod.weight_loader("weight", new.weight.detach())
    mod.weight_loader("bias", new.bias.detach())
    fresh = Fp8Linear(new, BLOCKWISE, train=False, name="x")
    assert torch.equal(mod.weight.view(torch.uint8), fresh.weight.view(torch.uint8))
    x = torch.randn(4, 200)
    assert torch.equal(mod(x), fresh(x))
    bad = new.weight.detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UsageError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight"):
        mod.weight_loader("weight", bad)


def test_fp8_mm_matches_dequantized_matmul():
    x, w = torch.randn(6, 256), torch.randn(128, 256)
    wq, ws = quantize(w, BLOCKWISE.weight_tile)
    y = fp8_mm(x, wq, ws, BLOCKWISE)[0]
    ref = fake_quant(x, BLOCKWISE.act_tile) @ fake_quant(w, BLOCKWISE.weight_tile).t()
    assert torch.allclose(y, ref, atol=1e-5)


def _experts(seed: int = 0, hidden: int = 96, inter: int = 80) -> Experts:
    torch.manual_seed(seed)
    e = Experts(4, hidden, inter)
    with torch.no_grad():
        e.gate_up_proj.normal_(0, 0.1)
        e.down_proj.normal_(0, 0.1)
    return e


def test_fp8_experts_modes_agree_and_stay_close_to_bf16_free_experts():
    ref = _experts()
    roll = Fp8Experts(copy.deepcopy(ref), BLOCKWISE, train=False, name="e")
    train = Fp8Experts(copy.deepcopy(ref), BLOCKWISE, train=True, name="e")
    x = torch.randn(11, 96)
    idx = torch.randint(0, 4, (11, 2))
    w = torch.rand(11, 2)
    assert torch.equal(roll(x, idx, w), train(x, idx, w))
    y_ref = ref(x, idx, w)
    assert float((train(x, idx, w) - y_ref).norm() / y_ref.norm()) < 0.08
    train(x, idx, w).sum().backward()
    assert train.gate_up_proj.grad is not None and train.gate_up_proj.grad.abs().sum() > 0


def test_engine_style_weight_sync_through_load_hf_tensors_requantizes_experts_and_linears():
    src, dst = tiny_moe(seed=1), tiny_moe(seed=2)
    convert_model(dst, BLOCKWISE, train=False)
    load_hf_tensors(dst, named_hf_tensors(src))  # per-expert HF names, as Engine.update_weights does
    expect = copy.deepcopy(src)
    convert_model(expect, BLOCKWISE, train=False)
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(dst(ids).logits, expect(ids).logits)


def test_convert_model_keeps_router_lm_head_embeddings_and_patterns_high_precision():
    model = tiny_moe()
    names = convert_model(model, BLOCKWISE, train=True, keep=("o_proj", "model.layers.1.*"))
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.mlp.experts" in names
    assert not any(n.endswith((".gate", "o_proj")) or n == "lm_head" or ".layers.1." in n for n in names)
    assert type(model.model.layers[0].mlp.gate) is torch.nn.Linear
    assert is_high_precision("model.embed_tokens") and not is_high_precision("model.layers.0.mlp.gate_proj")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_scaled_mm_matches_the_cpu_emulation(recipe, dtype):
    from miles_fp8.linear import gemm_path

    r = RECIPES[recipe]
    torch.manual_seed(0)
    x, w = torch.randn(256, 512).to(dtype), torch.randn(384, 512).to(dtype)
    q_cpu, s_cpu = quantize(x, r.act_tile)
    q_gpu, s_gpu = quantize(x.cuda(), r.act_tile, fast=True)  # the fused kernel when it is exact
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8)) and torch.equal(
        s_gpu.cpu(), s_cpu
    )
    wq, ws = quantize(w.cuda(), r.weight_tile)
    y_gpu = fp8_mm(x.cuda(), wq, ws, r)[0]
    path = gemm_path(x.cuda(), wq, r)  # decided once (probe), the same for every row count
    y_emu = fp8_mm(x, wq.cpu(), ws.cpu(), r)[0]
    rel = float((y_gpu.cpu().float() - y_emu.float()).norm() / y_emu.float().norm())
    print(f"recipe={recipe} dtype={dtype} path={path} rel_diff_vs_emulation={rel:.2e}")
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-3)
    # Hopper: blockwise on the Triton GEMM, tensorwise / rowwise on torch._scaled_mm
    assert path == ("triton" if recipe == "blockwise" else "scaled_mm")
    assert gemm_path(x[:1].cuda(), wq, r) == path
