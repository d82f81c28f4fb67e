"""The grouped FP8 expert kernels (`miles_fp8.triton_experts`, blockwise recipe): against a float64
reference under Triton's interpreter on CPU (several expert counts, empty experts, top-k 1 and >1, rows
and dims that are not a multiple of their block, decode and prefill row blocks); on CUDA, captured ==
uncaptured greedy tokens and agreement with the per-expert loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miles_core.testing import greedy_tokens, tail_vs_alone_rel

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PLUGIN_ROOT.parents[1] / "tests"))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402

KERNEL_CHECK = f"""
import sys
sys.path.insert(0, {str(PLUGIN_ROOT)!r})
import torch
import torch.nn.functional as F
from miles_core.api import Experts, expert_bounds, expert_order
from miles_fp8 import triton_experts, triton_fp8
from miles_fp8.linear import Fp8Experts
from miles_fp8.quant import RECIPES, dequantize, quantize, quantize_dequantize

W, A = (128, 128), (1, 128)


def reference(x, idx, w, q):
    # float64 products of the same quantized numbers the FP8 path multiplies (x and the SwiGLU output
    # quantized in 1x128 tiles; the SwiGLU output rounded to x's dtype first, as the kernel stores it)
    g, u, d = (dequantize(q[f"{{n}}_fp8"], q[f"{{n}}_scale"], W).double() for n in ("gate", "up", "down"))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = quantize_dequantize(x[t : t + 1], A).double()[0]
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = (F.silu(g[e] @ xt) * (u[e] @ xt)).to(x.dtype)
            out[t] += w[t, j].double() * (d[e] @ quantize_dequantize(h[None], A).double()[0])
    return out


torch.manual_seed(0)
hidden, inter = 160, 144  # two 128-column blocks (one partial) in both; partial output tiles
for E, k, n in [(1, 1, 19), (4, 1, 5), (8, 2, 13), (8, 3, 37)]:
    x = torch.randn(n, hidden).pow(3)  # heavy tails: scales differ a lot between rows and blocks
    x[0, :128] = 0  # an all-zero activation tile
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
    if E == 8:
        idx[idx == 5] = 4  # expert 5 empty
    w = torch.rand(n, k)
    q = {{}}
    shapes = {{"gate": (E, inter, hidden), "up": (E, inter, hidden), "down": (E, hidden, inter)}}
    for name, shape in shapes.items():
        q[f"{{name}}_fp8"], q[f"{{name}}_scale"] = quantize(torch.randn(shape) * 0.1, W)
    ref = reference(x, idx, w, q)
    flat = idx.reshape(-1)
    order, dest = expert_order(flat, E)
    ys = triton_experts.fp8_experts(
        x, (order // k).to(torch.int32), expert_bounds(flat, E), q["gate_fp8"], q["up_fp8"], q["down_fp8"],
        q["gate_scale"], q["up_scale"], q["down_scale"],
    )
    got = (ys.double()[dest].view(n, k, hidden) * w.double()[..., None]).sum(1)
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, (E, k, n, err)

# The module: grouped (kernels) == its emulated per-expert loop
experts = Experts(8, hidden, inter)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.1)
    experts.down_proj.normal_(0, 0.1)
mod = Fp8Experts(experts, RECIPES["blockwise"], train=False)
assert mod.grouped
x, idx, w = torch.randn(11, hidden), torch.randint(0, 8, (11, 2)), torch.rand(11, 2)


def emulated_loop(mod, x, idx, w):
    # `grouped` off and the dense kernel off: the per-expert loop on the emulated GEMM
    saved = triton_experts.triton, triton_fp8.triton
    triton_experts.triton = triton_fp8.triton = None
    try:
        return mod(x, idx, w)
    finally:
        triton_experts.triton, triton_fp8.triton = saved


with torch.no_grad():
    fast = mod(x, idx, w)
    slow = emulated_loop(mod, x, idx, w)
torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)

# A token's output does not depend on the other tokens of the batch: the first 5 tokens alone and
# padded with 3 more (as a CUDA graph pads a decode batch to 8 rows) give the same bits
with torch.no_grad():
    alone = mod(x[:5], idx[:5], w[:5])
    padded = mod(x[:8], idx[:8], w[:8])
assert triton_experts.block_m(5, 10, 8) == triton_experts.block_m(8, 16, 8)
assert torch.equal(alone, padded[:5])

# bf16 (the engine's dtype): the kernels round the gate and up outputs, silu(gate), the SwiGLU product and
# the output to bf16 as the loop does, and the same activations quantize to the same codes, so here
# (where the loop's fp32 sums and the kernel's agree) the two are equal bit for bit.
mod = Fp8Experts(experts.to(torch.bfloat16), RECIPES["blockwise"], train=False)
x, w = x.bfloat16(), w.bfloat16()
with torch.no_grad():
    fast = mod(x, idx, w)
    slow = emulated_loop(mod, x, idx, w)
assert fast.dtype == torch.bfloat16 and torch.equal(fast, slow), (fast.float() - slow.float()).abs().max()

# The down projection reads the SwiGLU output quantized once in a separate pass where `preq_ok` holds, else
# quantizes it inside its kernel per column tile: the same codes, so the same bits
saved = triton_fp8.preq_ok
triton_fp8.preq_ok = lambda device: False
try:
    with torch.no_grad():
        inside = mod(x, idx, w)
finally:
    triton_fp8.preq_ok = saved
assert torch.equal(inside, fast)
assert triton_experts.preq_matches(torch.randn(20, hidden), "fp32")  # what the card probe asks

# The down kernel's transposed decode tile is 128 columns (`DOWN_SWAPPED`); 64 (the prefill tile's width)
# gives the same bits: a tile's width never changes a column's sums
assert triton_fp8.swapped(triton_experts.block_m(11, 22, 8)) and triton_experts.DOWN_SWAPPED["BLOCK_N"] == 128
triton_experts.DOWN_SWAPPED["BLOCK_N"] = 64
try:
    with torch.no_grad():
        narrow = mod(x, idx, w)
finally:
    triton_experts.DOWN_SWAPPED["BLOCK_N"] = 128
assert torch.equal(narrow, fast)

# torch.compile (the engine's compiled decode step) traces the grouped experts in one graph
with torch.no_grad():
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, idx, w), fast)
print("ok")
"""


@needs_interpreter
def test_fp8_kernels_match_float64_reference_under_the_interpreter():
    run_interpreted(KERNEL_CHECK)


TRAIN_CHECK = f"""
import sys
sys.path.insert(0, {str(PLUGIN_ROOT)!r})
import copy
import torch
from miles_core.api import Experts
from miles_fp8 import triton_experts, triton_fp8
from miles_fp8.linear import Fp8Experts
from miles_fp8.quant import RECIPES

torch.set_num_threads(1)
B = RECIPES["blockwise"]
torch.manual_seed(0)
hidden, inter, n = 160, 144, 9
experts = Experts(5, hidden, inter)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.1)
    experts.down_proj.normal_(0, 0.1)
    experts.down_proj[:, :, 128:] *= 30  # the down projection's two K blocks get different scales
fast, slow = (Fp8Experts(copy.deepcopy(experts), B, train=True) for _ in range(2))
assert fast.train_grouped and not fast.grouped
x = torch.randn(n, hidden).pow(3)
idx = torch.stack([torch.randperm(4)[:2] for _ in range(n)])  # expert 4 gets no token
w = torch.rand(n, 2)
g = torch.randn(n, hidden)


def run(mod, kernels):
    saved = triton_experts.triton, triton_fp8.triton
    if not kernels:  # the per-expert loop on the emulated GEMM (autograd through the loop's STE)
        triton_experts.triton = triton_fp8.triton = None
    try:
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = mod(xr, idx, wr)
        (y * g).sum().backward()
        return y.detach(), xr.grad, wr.grad, mod.gate_up_proj.grad, mod.down_proj.grad
    finally:
        triton_experts.triton, triton_fp8.triton = saved


got, want = run(fast, True), run(slow, False)
for name, a, b in zip(("y", "dx", "dw", "d_gate_up", "d_down"), got, want):
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < 1e-5, (name, err)
assert fast.down_proj.grad[4].abs().sum() == 0 and fast.gate_up_proj.grad[:4].abs().sum() > 0

# The forward is the rollout's, bit for bit: the reference model (no grad) and the rollout module built
# from the same master weights run the same kernels on the same codes
roll = Fp8Experts(copy.deepcopy(experts), B, train=False)
with torch.no_grad():
    assert torch.equal(fast(x, idx, w), got[0]) and torch.equal(roll(x, idx, w), got[0])
print("ok")
"""


@needs_interpreter
def test_training_forward_on_the_grouped_kernels_keeps_the_loops_gradients():
    run_interpreted(TRAIN_CHECK)


ENGINE_CHECK = f"""
import sys
sys.path.insert(0, {str(PLUGIN_ROOT)!r})
sys.path.insert(0, {str(PLUGIN_ROOT / "tests")!r})
import torch
from fp8_helpers import tiny_moe
from miles_core.testing import greedy_tokens
from miles_fp8.linear import convert_model, gemm_path
from miles_fp8.quant import RECIPES

torch.set_num_threads(1)
model = tiny_moe(hidden=128).to(dtype=torch.bfloat16).requires_grad_(False).eval()
convert_model(model, RECIPES["blockwise"], train=False)
q = model.model.layers[0].self_attn.q_proj
assert model.model.layers[0].mlp.experts.grouped
assert gemm_path(torch.zeros(1, 128), q.weight, q.recipe) == "triton"
engine, static = greedy_tokens(model, True, 64)  # on CPU: the static-shape (padded) step, not captured
assert engine.cuda_graph
_, eager = greedy_tokens(model, False, 64)
assert static == eager, (static, eager)
print("ok")
"""


@pytest.mark.slow
@needs_interpreter
def test_fp8_engine_static_step_equals_eager_greedy_tokens_under_the_interpreter():
    """The CPU analog of the GPU captured == eager test (~150 s): the engine's padded static decode step
    and its eager decode, every FP8 linear and expert on the Triton kernels, give the same greedy tokens."""
    run_interpreted(ENGINE_CHECK)


def test_only_blockwise_rollout_experts_are_grouped():
    from fp8_helpers import tiny_moe
    from miles_fp8 import triton_experts
    from miles_fp8.linear import Fp8Experts
    from miles_fp8.quant import RECIPES

    experts = tiny_moe(hidden=128).model.layers[0].mlp.experts
    has_triton = triton_experts.triton is not None
    assert Fp8Experts(experts, RECIPES["blockwise"], train=False).grouped == has_triton
    assert not Fp8Experts(experts, RECIPES["rowwise"], train=False).grouped
    assert not Fp8Experts(experts, RECIPES["blockwise"], train=True).grouped


def test_expert_tiles_are_the_same_for_a_batch_and_its_graph_padding():
    """The row block (and so the tensor-core instruction, and a row's bits) must not change when a CUDA
    graph pads a decode batch of n tokens to the next power of two (capped at the slot count)."""
    from miles_fp8.triton_experts import DECODE_BLOCK_M, PREFILL_BLOCK_M, block_m

    from miles_core.engine.cuda_graph import bucket

    # hand-counted: 128 experts top-8 -> 16 * 128 / 8 = 256 tokens; top-6 -> 341, so 256 (a power of 2)
    assert block_m(256, 256 * 8, 128) == DECODE_BLOCK_M and block_m(257, 257 * 8, 128) == PREFILL_BLOCK_M
    assert block_m(256, 256 * 6, 128) == DECODE_BLOCK_M and block_m(300, 300 * 6, 128) == PREFILL_BLOCK_M
    assert block_m(32, 64, 4) == DECODE_BLOCK_M and block_m(33, 66, 4) == PREFILL_BLOCK_M
    for experts, k in [(4, 2), (32, 4), (128, 8), (128, 6), (60, 3)]:
        for slots in (8, 48, 256, 512):
            for n in range(1, slots + 1):
                padded = bucket(n, slots)
                assert block_m(n, n * k, experts) == block_m(padded, padded * k, experts), (experts, k, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_engine_captured_equals_uncaptured_greedy_tokens():
    """Graphed, eager and graphed again give the same greedy tokens, with the grouped experts and the dense
    Triton GEMM in use (the first H100 run, with per-call `_scaled_mm` fallbacks, diverged at token 2)."""
    from fp8_helpers import tiny_moe
    from miles_fp8.linear import Fp8Experts, Fp8Linear, convert_model, gemm_path
    from miles_fp8.quant import RECIPES

    model = tiny_moe(hidden=256).to(device="cuda", dtype=torch.bfloat16).requires_grad_(False).eval()
    convert_model(model, RECIPES["blockwise"], train=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Fp8Experts) and experts.grouped and experts.cuda_graph_safe
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.zeros(1, 256, device="cuda", dtype=torch.bfloat16)
    assert isinstance(q_proj, Fp8Linear) and gemm_path(x, q_proj.weight, q_proj.recipe) == "triton"
    graphed_engine, graphed = greedy_tokens(model, True, 64)
    assert graphed_engine.cuda_graph and graphed_engine._graphs is not None and graphed_engine._graphs._graphs
    _, eager = greedy_tokens(model, False, 64)
    _, graphed_again = greedy_tokens(model, True, 64)
    assert graphed == eager == graphed_again


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_grouped_kernel_matches_the_per_expert_loop_on_cuda():
    """Grouped kernels vs the per-expert loop (each expert through the dense Triton GEMM, then through the
    emulation); a token's output is the same alone and in a padded batch."""
    from miles_fp8 import triton_experts, triton_fp8
    from miles_fp8.linear import Fp8Experts
    from miles_fp8.quant import RECIPES

    from miles_core.api import Experts

    torch.manual_seed(0)
    experts = Experts(32, 512, 384).cuda()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.05)
        experts.down_proj.normal_(0, 0.05)
    mod = Fp8Experts(experts, RECIPES["blockwise"], train=False)
    for n in (5, 64, 700):  # decode and prefill row blocks
        x = torch.randn(n, 512, device="cuda", dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(32, device="cuda")[:4] for _ in range(n)])
        w = torch.softmax(torch.rand(n, 4, device="cuda"), -1)
        with torch.no_grad():
            fast = mod(x, idx, w).float()
            saved = triton_experts.triton, triton_fp8.triton
            try:
                triton_experts.triton = None  # the loop, its GEMMs on the dense kernel
                loop = mod(x, idx, w).float()
                triton_fp8.triton = None  # the loop, emulated
                slow = mod(x, idx, w).float()
            finally:
                triton_experts.triton, triton_fp8.triton = saved
            alone = mod(x[:3], idx[:3], w[:3]).float()
        rel = ((fast - slow).norm() / slow.norm()).item()
        rel_loop = ((fast - loop).norm() / loop.norm()).item()
        print(f"n={n} grouped_vs_emulated={rel:.2e} grouped_vs_dense_loop={rel_loop:.2e}")
        assert rel < 1e-2 and rel_loop < 1e-2
        if triton_experts.block_m(3, 12, 32) == triton_experts.block_m(n, 4 * n, 32):
            assert torch.equal(alone, fast[:3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_training_experts_on_the_grouped_kernels_match_the_loop_on_cuda(dtype):
    """Unified-FP8 training forward on the grouped kernels + its written-out STE backward vs autograd
    through the per-expert loop (each expert on the dense Triton GEMM)."""
    import copy

    from miles_fp8 import triton_experts
    from miles_fp8.linear import Fp8Experts
    from miles_fp8.quant import RECIPES

    from miles_core.api import Experts

    torch.manual_seed(0)
    base = Experts(32, 512, 384).cuda()
    with torch.no_grad():
        base.gate_up_proj.normal_(0, 0.05)
        base.down_proj.normal_(0, 0.05)
    base = base.to(dtype)
    x = torch.randn(300, 512, device="cuda", dtype=dtype)
    idx = torch.stack([torch.randperm(32, device="cuda")[:4] for _ in range(300)])
    w = torch.softmax(torch.rand(300, 4, device="cuda"), -1).to(dtype)
    g = torch.randn(300, 512, device="cuda", dtype=dtype)
    outs = []
    for grouped in (True, False):
        mod = Fp8Experts(copy.deepcopy(base), RECIPES["blockwise"], train=True)
        saved = triton_experts.triton
        try:
            if not grouped:
                triton_experts.triton = None
            assert mod.train_grouped == grouped
            xr = x.clone().requires_grad_(True)
            y = mod(xr, idx, w)
            (y.float() * g.float()).sum().backward()
        finally:
            triton_experts.triton = saved
        outs.append((y.detach(), xr.grad, mod.gate_up_proj.grad, mod.down_proj.grad))
    for name, a, b in zip(("y", "dx", "d_gate_up", "d_down"), *outs):
        rel = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"dtype={dtype} {name}: grouped vs loop rel={rel:.2e}")
        assert rel < (2e-2 if dtype == torch.bfloat16 else 1e-3), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_grouped_kernels_address_copies_past_2_31_elements():
    """One prefill of ~1.1M token copies at hidden 2048: the output offsets of the last copies pass 2^31
    elements. Their rows still match the same tokens run alone (int32 offsets would wrap and write or
    read elsewhere)."""
    from miles_fp8.linear import Fp8Experts
    from miles_fp8.quant import RECIPES

    from miles_core.api import Experts

    torch.manual_seed(0)
    experts, hidden, inter = 64, 2048, 128
    bf16 = Experts(experts, hidden, inter).cuda()
    with torch.no_grad():
        bf16.gate_up_proj.normal_(0, 0.05)
        bf16.down_proj.normal_(0, 0.05)
    rel = tail_vs_alone_rel(Fp8Experts(bf16, RECIPES["blockwise"], train=False), hidden, experts)
    assert rel < 1e-2, rel
