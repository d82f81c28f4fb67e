"""CUDA: the tinygemm INT4 matmul (``torch._weight_int4pack_mm``) matches the dequantize-then-matmul
reference, tile-row stores (gate and up written separately) equal a whole-matrix store, and INT4 experts
on tinygemm agree with the dequant kernel."""

from __future__ import annotations

import pytest
import torch
from miles_int4qat.fake_quant import fake_quant_values
from miles_int4qat.modules import Int4Experts, make_kernel, quantize_for_rollout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEV = torch.device("cuda")


@pytest.mark.parametrize(("n", "k", "g"), [(1024, 1024, 128), (1024, 512, 128), (256, 96 * 4, 32)])
@pytest.mark.parametrize("m", [1, 64])
def test_tinygemm_matmul_matches_reference(n, k, g, m):
    torch.manual_seed(0)
    w = torch.randn(n, k, device=DEV) * 0.02
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    kern = make_kernel("tinygemm", g, torch.bfloat16, DEV, [(n, k)])
    packed, scales = kern.alloc((), n, k)
    kern.store(packed, scales, w[: n // 2])
    kern.store(packed, scales, w[n // 2 :], n // 2)  # two tile-row stores, as gate and up are synced
    wq = fake_quant_values(w, g)
    torch.testing.assert_close(kern.dequant(packed, scales).float(), wq, rtol=1e-2, atol=1e-6)
    ref = x.float() @ wq.t()
    out = kern.matmul(x, packed, scales).float()
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_int4_experts_tinygemm_matches_dequant_kernel():
    torch.manual_seed(0)
    from miles_core.model import ModelConfig, build_model

    cfg = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 128, "norm_topk_prob": True,
        }
    )  # fmt: skip
    model = build_model(cfg, dtype=torch.bfloat16, device=DEV)
    import copy

    fast, slow = copy.deepcopy(model), copy.deepcopy(model)
    quantize_for_rollout(fast, "experts", 128, kind="tinygemm")
    quantize_for_rollout(slow, "experts", 128, kind="dequant")
    assert isinstance(fast.model.layers[0].mlp.experts, Int4Experts)
    assert fast.model.layers[0].mlp.experts.kernel.kind == "tinygemm"
    ids = torch.randint(0, 512, (4, 32), device=DEV)
    with torch.no_grad():
        a, b = fast(ids).logits.float(), slow(ids).logits.float()
    assert (a - b).norm() / b.norm() < 2e-2
