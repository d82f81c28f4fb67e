"""The grouped W4A16 expert kernels (`miles_int4qat.triton_experts`): against a float64 reference under
Triton's interpreter on CPU (several expert counts, empty experts, top-k 1 and >1, rows that are not a
multiple of the row block, decode and prefill row blocks, K tiles of 16, 32 and 64 columns, fp32, bf16
and fp16 x), the dequantization and column order alone, the sm_90 instructions they compile to (no GPU
needed); on CUDA, captured == uncaptured greedy tokens and agreement with the tinygemm loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miles_core.testing import greedy_tokens, tail_vs_alone_rel

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
# (experts, top-k, rows, group, hidden, inter): one expert (prefill row block: 19 copies > 16 per expert),
# top-1 and top-3, rows not a multiple of 16, experts that get no row, an expert with more than one row
# block; K tiles of 16 columns (groups 16, 48), 32 (group 32), 64 (group 64) and 128 (group 128), partial
# column tiles
# SWAP_MAX_BLOCK_M 0: the same with no tile transposed (weights as the MMA's column operand)
for swap_max, E, k, n, g, hidden, inter in [
    (64, 1, 1, 19, 16, 96, 48), (64, 4, 1, 5, 16, 96, 48), (64, 8, 2, 13, 16, 96, 48),
    (64, 8, 3, 37, 16, 96, 48), (64, 6, 2, 9, 48, 96, 48), (64, 8, 2, 13, 32, 192, 96),
    (64, 2, 1, 70, 64, 128, 64), (64, 4, 3, 6, 64, 128, 64), (0, 2, 1, 70, 64, 128, 64),
    (0, 4, 3, 6, 64, 128, 64), (64, 3, 2, 7, 128, 256, 128),
]:  # fmt: skip
    triton_experts.SWAP_MAX_BLOCK_M = swap_max
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
    assert err < 1e-5, (swap_max, E, k, n, g, err)
triton_experts.SWAP_MAX_BLOCK_M = 64

# bf16 (the engine's dtype) and fp16: each copy's output against float64 sums rounded to x's dtype where
# the kernels round (gate and up outputs, silu(gate), their product, the output); only near-ties of the
# fp32 sums may differ by one step. Group 32: K tiles of 32 columns (the permuted column order).
E, k, n, g, hidden, inter = 8, 2, 13, 32, 192, 96
idx = torch.stack([torch.randperm(E)[:k] for _ in range(n)])
gu_p, gu_s = quantize_pack(torch.randn(E, 2 * inter, hidden) * 0.2, g)
d_p, d_s = quantize_pack(torch.randn(E, hidden, inter) * 0.2, g)
gu_s, d_s = gu_s.to(torch.bfloat16), d_s.to(torch.bfloat16)
flat = idx.reshape(-1)
order, dest = expert_order(flat, E)
src = (order // k).to(torch.int32)
gu, dn = dequantize(gu_p, gu_s, g, torch.float64), dequantize(d_p, d_s, g, torch.float64)
x32 = torch.randn(n, hidden)
for dtype in (torch.bfloat16, torch.float16):
    x = x32.to(dtype)
    ys = triton_experts.int4_experts(x, src, expert_bounds(flat, E), gu_p, gu_s, d_p, d_s, g)
    rd = lambda t: t.to(dtype).double()  # noqa: E731
    ref = []
    for j in range(n * k):
        e, h = int(flat[order[j]]), gu[int(flat[order[j]])] @ x[int(src[j])].double()
        gate, up = rd(h[:inter]), rd(h[inter:])
        ref.append((dn[e] @ rd(rd(F.silu(gate)) * up)).to(dtype))
    ref = torch.stack(ref)
    assert ys.dtype == dtype
    same = (ys == ref).float().mean().item()
    assert same > 0.97, (dtype, same)
    tol = dict(atol=1e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=2e-3, rtol=4e-3)
    torch.testing.assert_close(ys.float(), ref.float(), **tol)

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
    a, b = grouped(x, idx, w), loop(x, idx, w)
# fp32 sums in other orders, on outputs up to ~45: the loop itself is ~2e-5 off float64 here
torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=1e-5)
print("ok")
"""
)


@needs_interpreter
def test_int4_kernels_match_float64_reference_under_the_interpreter():
    run_interpreted(KERNEL_CHECK)


DEQUANT_CHECK = (
    PRELUDE
    + """
import triton
import triton.language as tl
from miles_int4qat.packing import pack_int4, unpack_int4
from miles_int4qat.triton_experts import MAGIC, _dequant, _kcols

@triton.jit
def probe(p_ptr, w_ptr, k_ptr, magic, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    n = tl.arange(0, BN)
    p = tl.load(p_ptr + n[:, None] * (BK // 8) + tl.arange(0, BK // 8)[None, :])
    w = _dequant(p, magic, DT, BN, BK, True)
    tl.store(w_ptr + n[:, None] * BK + tl.arange(0, BK)[None, :], w)
    tl.store(k_ptr + tl.arange(0, BK), _kcols(BK))

# The column order, derived by hand: BK 16: c = 8w + 2i + h holds k = 8w + i + 4h; BK 32: c = 8j + 2t + h
# (j = nibble pair, t = word) holds k = 8t + j + 4h; BK 64 and 128: c = 32bh + 16bl + 8s + 2t + h holds
# word (BK / 32) t + bh, nibble 2bl + s + 4h
want = {
    16: [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15],
    32: [8 * t + j + 4 * h for j in range(4) for t in range(4) for h in range(2)],
}
for bk in (64, 128):
    digits = [(bh, bl, s, t, h) for bh in range(bk // 32) for bl in range(2) for s in range(2)
              for t in range(4) for h in range(2)]
    want[bk] = [8 * (bk // 32 * t + bh) + 2 * bl + s + 4 * h for bh, bl, s, t, h in digits]
    assert sorted(want[bk]) == list(range(bk))
torch.manual_seed(0)
for bk in (16, 32, 64, 128):
    q = torch.randint(-8, 8, (16, bk), dtype=torch.int8)
    q[0, :16] = torch.arange(-8, 8)  # every nibble
    for dtype, DT in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        bits = MAGIC[dtype][0]
        w, kc = torch.empty(16, bk), torch.empty(bk, dtype=torch.int32)
        probe[(1,)](pack_int4(q), w, kc, bits | bits << 16, DT=DT, BN=16, BK=bk)
        assert kc.tolist() == want[bk], (bk, kc.tolist())
        assert torch.equal(w, q[:, kc.long()].float()), (bk, dtype)
        assert torch.equal(unpack_int4(pack_int4(q)), q)
print("ok")
"""
)


@needs_interpreter
def test_int4_dequant_gives_exact_values_in_the_permuted_column_order():
    """`_dequant` (magic-number bf16 / fp16 values) against the unpacked int4 values in `_kcols`'s order,
    which is pinned by hand for each K tile width."""
    run_interpreted(DEQUANT_CHECK)


def test_int4_kernels_compile_to_wgmma_with_register_weights_for_hopper_without_a_gpu():
    """Ahead-of-time compile (no GPU needed) of both kernels for sm_90, decode (16 rows) and prefill (64)
    tiles, 128-column K tiles: the weight tile is wgmma's register operand (``{...}, {...}, desc``), its
    values come from a packed bf16x2 / f16x2 add (the magic-number dequantization), never from an
    int-to-float conversion (the old kernel converted every weight with ``cvt.rn.bf16.s32``)."""
    import re

    triton = pytest.importorskip("triton")
    from miles_int4qat import triton_experts
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, sig: dict, consts: dict) -> str:
        sig = {**sig, **{k: "constexpr" for k in consts}}
        src = ASTSource(
            fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()}
        )
        kernel = triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}
        )
        return kernel.asm["ptx"]

    common = {"p_ptr": "*i32", "s_ptr": "*bf16", "bounds_ptr": "*i32", "hidden": "i32", "inter": "i32"}
    for dt, ty in (("bf16", "bf16"), ("fp16", "f16")):
        gate_up = {"x_ptr": f"*{dt}", **common, "src_ptr": "*i32", "out_ptr": f"*{dt}", "stride_x": "i32",
                   "n_chunks": "i32", "magic": "i32"}  # fmt: skip
        down = {"a_ptr": f"*{dt}", **common, "out_ptr": f"*{dt}", "n_chunks": "i32", "magic": "i32"}
        for block_m in (triton_experts.DECODE_BLOCK_M, triton_experts.PREFILL_BLOCK_M):
            assert triton_experts.swapped(block_m)
            consts = {"GROUP": 128, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "PREC": "tf32",
                      "INTERP": False, "SWAP": True}  # fmt: skip
            for fn, sig in (
                (triton_experts._int4_gate_up_kernel, gate_up),
                (triton_experts._int4_down_kernel, down),
            ):
                ptx = build(fn, sig, consts)
                mma = rf"wgmma\.mma_async\.sync\.aligned\.m64n{block_m}k16\.f32\.{ty}\.{ty} \{{[^}}]*\}}, \{{"
                assert re.search(mma, ptx), (dt, block_m, fn.__name__)
                assert not re.search(r"cvt\.rn\.(bf16|f16|f32)\.s32", ptx), (dt, block_m, fn.__name__)
                assert f"add.{ty}x2" in ptx, (dt, block_m, fn.__name__)
    # not transposed (bench/quant_experts.py --int4-swap-max-m 16): the weights as the column operand
    consts = {"GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "PREC": "tf32", "INTERP": False,
              "SWAP": False}  # fmt: skip
    ptx = build(triton_experts._int4_down_kernel, down, consts)
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16" in ptx and "add.f16" in ptx  # unpaired here
    assert not re.search(r"cvt\.rn\.(bf16|f16|f32)\.s32", ptx)


def test_expert_tiles_are_the_same_for_a_batch_and_its_graph_padding():
    """The row block (and so the instruction and a row's bits) must not change when a CUDA graph pads a
    decode batch of n tokens to the next power of two (capped at the slot count)."""
    from miles_int4qat.triton_experts import DECODE_BLOCK_M, PREFILL_BLOCK_M, block_m

    from miles_core.engine.cuda_graph import bucket

    # hand-counted: 128 experts top-8 -> 16 * 128 / 8 = 256 tokens; top-6 -> 341, so 256 (a power of 2)
    assert block_m(256, 256 * 8, 128) == DECODE_BLOCK_M and block_m(257, 257 * 8, 128) == PREFILL_BLOCK_M
    assert block_m(256, 256 * 6, 128) == DECODE_BLOCK_M and block_m(300, 300 * 6, 128) == PREFILL_BLOCK_M
    for experts, k in [(4, 2), (32, 4), (128, 8), (128, 6), (60, 3)]:
        for slots in (8, 48, 256, 512):
            for n in range(1, slots + 1):
                padded = bucket(n, slots)
                assert block_m(n, n * k, experts) == block_m(padded, padded * k, experts), (experts, k, n)


def test_grouped_needs_dequant_layout_and_group_of_16():
    from miles_int4qat import triton_experts

    # K tiles: the largest of 128, 64, 32, 16 under the cap that divides the group
    assert [triton_experts.block_k(g, 128) for g in (128, 256, 64, 96, 48, 16)] == [128, 128, 64, 32, 16, 16]
    assert [triton_experts.block_k(g, 64) for g in (128, 32)] == [64, 32]
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [5, 300])  # the decode (16-row) and prefill (64-row) tiles
def test_int4_kernels_match_rounded_float64_sums_on_cuda(dtype, tokens):
    """On the card (the magic-number subtraction in bf16 / fp16, wgmma), group 128 (64-column K tiles):
    each copy's output against float64 sums rounded to x's dtype where the kernels round; only near-ties
    of the fp32 sums may differ by one step."""
    import torch.nn.functional as F
    from miles_int4qat import triton_experts
    from miles_int4qat.packing import dequantize, quantize_pack

    from miles_core.api import expert_bounds, expert_order

    torch.manual_seed(0)
    experts, k, g, hidden, inter = 8, 2, 128, 512, 256
    assert triton_experts.block_m(tokens, tokens * k, experts) == (16 if tokens == 5 else 64)
    gu_p, gu_s = quantize_pack(torch.randn(experts, 2 * inter, hidden) * 0.05, g)
    d_p, d_s = quantize_pack(torch.randn(experts, hidden, inter) * 0.05, g)
    gu_s, d_s = gu_s.to(torch.bfloat16), d_s.to(torch.bfloat16)
    x = torch.randn(tokens, hidden).to(dtype)
    flat = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).reshape(-1)
    order, _ = expert_order(flat, experts)
    src = (order // k).to(torch.int32)
    dev = torch.device("cuda")
    args = [t.to(dev) for t in (x, src, expert_bounds(flat, experts), gu_p, gu_s, d_p, d_s)]
    ys = triton_experts.int4_experts(*args, g).cpu()
    gu, dn = dequantize(gu_p, gu_s, g, torch.float64), dequantize(d_p, d_s, g, torch.float64)
    rd = lambda t: t.to(dtype).double()  # noqa: E731
    e_of = flat[order]
    ref = torch.empty(src.numel(), hidden, dtype=dtype)
    for e in range(experts):
        rows = (e_of == e).nonzero().squeeze(1)
        h = x[src[rows].long()].double() @ gu[e].t()
        act = rd(rd(F.silu(rd(h[:, :inter]))) * rd(h[:, inter:]))
        ref[rows] = (act @ dn[e].t()).to(dtype)
    same = (ys == ref).float().mean().item()
    print(f"{dtype} tokens {tokens}: {same:.4f} of outputs equal the rounded float64 sums")
    assert same > 0.97, same
    torch.testing.assert_close(ys.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int4_grouped_kernels_address_copies_past_2_31_elements():
    """One prefill of ~1.1M token copies at hidden 2048: the output offsets of the last copies pass 2^31
    elements. Their rows still match the same tokens run alone (int32 offsets would wrap and write or
    read elsewhere)."""
    from miles_int4qat.modules import Int4Experts, Int4Kernel

    torch.manual_seed(0)
    experts, hidden, inter, dev = 64, 2048, 128, torch.device("cuda")
    mod = Int4Experts(experts, hidden, inter, Int4Kernel("dequant", 128, torch.bfloat16, dev), grouped=True)
    mod.weight_loader("gate_up_proj", torch.randn(experts, 2 * inter, hidden) * 0.05)
    mod.weight_loader("down_proj", torch.randn(experts, hidden, inter) * 0.05)
    rel = tail_vs_alone_rel(mod, hidden, experts)
    assert rel < 1e-2, rel
