"""The grouped W4A16 expert kernels (`miles_int4qat.triton_experts`): against a float64 reference under
Triton's interpreter on CPU (several expert counts, empty experts, top-k 1 and >1, rows that are not a
multiple of the row block, decode and prefill row blocks); on CUDA, captured == uncaptured greedy
tokens and agreement with the tinygemm loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miles_core.testing import greedy_tokens

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PLUGIN_ROOT.parents[1] / "tests"))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402

PRELUDE = f"""
import sys
sys.path.insert(0, {str(PLUGIN_ROOT)!r})
import torch
import torch.nn.functional as F
from miles_core.api import expert_bounds, expert_order
from miles_int4qat import triton_experts
from miles_int4qat.modules import Int4Experts, Int4Kernel
from miles_int4qat.packing import dequantize, quantize_pack
"""

KERNEL_CHECK = (
    PRELUDE
    + """
def reference(x, idx, w, gu_p, gu_s, d_p, d_s, g):
    # float64: dequantize exactly (q * bf16 scale), then the SwiGLU experts and the weighted sum
    gu = dequantize(gu_p, gu_s, g, torch.float64)
    dn = dequantize(d_p, d_s, g, torch.float64)
    inter = gu.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = gu[e] @ x[t].double()
            out[t] += w[t, j].double() * (dn[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out

torch.manual_seed(0)
hidden, inter = 96, 48  # partial gate/up (32) and down (64) column tiles
# (experts, top-k, rows, group): one expert (prefill row block: 19 copies > 16 per expert), top-1 and
# top-3, rows not a multiple of 16, experts that get no row, an expert with more than one row block
for E, k, n, g in [(1, 1, 19, 16), (4, 1, 5, 16), (8, 2, 13, 16), (8, 3, 37, 16), (6, 2, 9, 48)]:
    x = torch.randn(n, hidden)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    if E == 8:
        idx[idx == 5] = 4  # expert 5 empty
        idx[:, 0] = torch.where(idx[:, 1:].eq(2).any(1), idx[:, 0], 2) if k > 1 else 2  # expert 2 busy
    w = torch.rand(n, k)
    gu_p, gu_s = quantize_pack(torch.randn(E, 2 * inter, hidden) * 0.2, g)
    d_p, d_s = quantize_pack(torch.randn(E, hidden, inter) * 0.2, g)
    gu_s, d_s = gu_s.to(torch.bfloat16), d_s.to(torch.bfloat16)
    ref = reference(x, idx, w, gu_p, gu_s, d_p, d_s, g)
    flat = idx.reshape(-1)
    order, dest = expert_order(flat, E)
    ys = triton_experts.int4_experts(
        x, (order // k).to(torch.int32), expert_bounds(flat, E), gu_p, gu_s, d_p, d_s, g
    )
    got = (ys.double()[dest].view(n, k, hidden) * w.double()[..., None]).sum(1)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, (E, k, n, g, err)

# bf16 (the engine's dtype): each copy's output against float64 sums rounded to bf16 where the kernels
# round (gate and up outputs, silu(gate), their product, the output); only near-ties of the fp32 sums
# may differ by one bf16 step.
E, k, n, g = 8, 2, 13, 16
x = torch.randn(n, hidden).bfloat16()
idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
gu_p, gu_s = quantize_pack(torch.randn(E, 2 * inter, hidden) * 0.2, g)
d_p, d_s = quantize_pack(torch.randn(E, hidden, inter) * 0.2, g)
gu_s, d_s = gu_s.to(torch.bfloat16), d_s.to(torch.bfloat16)
flat = idx.reshape(-1)
order, dest = expert_order(flat, E)
src = (order // k).to(torch.int32)
ys = triton_experts.int4_experts(x, src, expert_bounds(flat, E), gu_p, gu_s, d_p, d_s, g)
gu, dn = dequantize(gu_p, gu_s, g, torch.float64), dequantize(d_p, d_s, g, torch.float64)
bf = lambda t: t.to(torch.bfloat16).double()  # noqa: E731
ref = []
for j in range(n * k):
    e, h = int(flat[order[j]]), gu[int(flat[order[j]])] @ x[int(src[j])].double()
    gate, up = bf(h[:inter]), bf(h[inter:])
    ref.append((dn[e] @ bf(bf(F.silu(gate)) * up)).to(torch.bfloat16))
ref = torch.stack(ref)
assert ys.dtype == torch.bfloat16
same = (ys == ref).float().mean().item()
assert same > 0.97, same
torch.testing.assert_close(ys.float(), ref.float(), atol=1e-2, rtol=2e-2)

# The module: grouped == its per-expert loop (same numbers, fp32)
kern = Int4Kernel("dequant", 16, torch.float32, torch.device("cpu"))
loop = Int4Experts(8, hidden, inter, kern)
grouped = Int4Experts(8, hidden, inter, kern, grouped=True)
gu, dn = torch.randn(8, 2 * inter, hidden) * 0.2, torch.randn(8, hidden, inter) * 0.2
for m in (loop, grouped):
    m.weight_loader("gate_up_proj", gu)
    m.weight_loader("down_proj", dn)
x, idx, w = torch.randn(11, hidden), torch.randint(0, 8, (11, 2)), torch.rand(11, 2)
with torch.no_grad():
    torch.testing.assert_close(grouped(x, idx, w), loop(x, idx, w), atol=1e-5, rtol=1e-5)
print("ok")
"""
)


@needs_interpreter
def test_int4_kernels_match_float64_reference_under_the_interpreter():
    run_interpreted(KERNEL_CHECK)


def test_grouped_needs_dequant_layout_and_group_of_16():
    from miles_int4qat import triton_experts
    from miles_int4qat.modules import Int4Experts, Int4Kernel

    assert triton_experts.usable(32) == (triton_experts.triton is not None)
    assert not triton_experts.usable(8) and not triton_experts.usable(24)
    with pytest.raises(ValueError, match="group size"):
        Int4Experts(2, 16, 16, Int4Kernel("dequant", 8, torch.float32, torch.device("cpu")), grouped=True)


def test_auto_kernel_groups_experts_only_on_cuda_with_a_group_of_16k():
    from miles_int4qat import triton_experts
    from miles_int4qat.modules import grouped_experts_ok

    assert not grouped_experts_ok(torch.device("cpu"), 128)  # CPU: the dequant loop (graphs never run)
    on_cuda = triton_experts.triton is not None
    assert grouped_experts_ok(torch.device("cuda"), 128) == on_cuda
    assert not grouped_experts_ok(torch.device("cuda"), 8)


def test_loop_experts_declare_cuda_graphs_unsafe_only_on_cuda():
    from miles_int4qat.modules import Int4Experts, Int4Kernel

    cpu = Int4Experts(2, 16, 16, Int4Kernel("dequant", 16, torch.float32, torch.device("cpu")))
    assert cpu.cuda_graph_safe  # on CPU the engine never captures
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        loop = Int4Experts(2, 16, 16, Int4Kernel("dequant", 16, torch.float32, dev))
        assert not loop.cuda_graph_safe
        assert Int4Experts(
            2, 16, 16, Int4Kernel("dequant", 16, torch.float32, dev), grouped=True
        ).cuda_graph_safe


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_engine_captured_equals_uncaptured_greedy_tokens():
    from miles_int4qat.modules import Int4Experts, quantize_for_rollout

    from miles_core.api import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 4,
            "moe_intermediate_size": 128, "norm_topk_prob": True,
        }
    )  # fmt: skip
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda").eval()
    quantize_for_rollout(model, "experts", 64, kind="auto")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Int4Experts) and experts.grouped and experts.cuda_graph_safe
    graphed_engine, graphed = greedy_tokens(model, True, 512)
    assert graphed_engine.cuda_graph and graphed_engine._graphs is not None and graphed_engine._graphs._graphs
    _, eager = greedy_tokens(model, False, 512)
    assert graphed == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_grouped_kernel_matches_tinygemm_loop_in_bf16():
    from miles_int4qat.modules import quantize_for_rollout

    from miles_core.api import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 512, "hidden_size": 512,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4,
            "moe_intermediate_size": 256, "norm_topk_prob": True,
        }
    )  # fmt: skip
    import copy

    model = build_model(cfg, dtype=torch.bfloat16, device="cuda").eval()
    grouped, loop = copy.deepcopy(model), copy.deepcopy(model)
    quantize_for_rollout(grouped, "experts", 128, kind="auto")
    quantize_for_rollout(loop, "experts", 128, kind="tinygemm")
    for n in (3, 64, 700):  # decode row block, and the prefill row block
        ids = torch.randint(0, 512, (1, n), device="cuda")
        with torch.no_grad():
            a, b = grouped(ids).logits.float(), loop(ids).logits.float()
        assert (a - b).norm() / b.norm() < 2e-2
