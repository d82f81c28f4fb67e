"""The dense blockwise FP8 GEMM (`miles_fp8.triton_fp8.fp8_linear`, what rollout and training `Fp8Linear`
run): against a float64 reference and the emulated path under Triton's interpreter on CPU; on CUDA,
rows independent of the batch size (alone, in a batch, in a CUDA graph) and close to the emulation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PLUGIN_ROOT.parents[1] / "tests"))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402

DENSE_CHECK = f"""
import sys
sys.path.insert(0, {str(PLUGIN_ROOT)!r})
import copy
import torch
from miles_fp8 import triton_fp8
from miles_fp8.linear import Fp8Linear, fp8_mm, gemm_path
from miles_fp8.quant import RECIPES, fake_quant, quantize

torch.set_num_threads(1)
B = RECIPES["blockwise"]


def reference(x, wq, ws):
    # float64: per 128-column block b, (x codes . w codes) * x_scale[row, b] * w_scale[n // 128, b]
    xq, xs = quantize(x, (1, 128))
    w_s = ws.double().repeat_interleave(128, 0)[: wq.shape[0]]
    out = torch.zeros(x.shape[0], wq.shape[0], dtype=torch.float64)
    for b in range(xs.shape[1]):
        k = slice(128 * b, 128 * (b + 1))
        out += (xq[:, k].double() @ wq[:, k].double().T) * xs[:, b : b + 1].double() * w_s[None, :, b]
    return out


def emulated(x, wq, ws):
    saved, triton_fp8.triton = triton_fp8.triton, None  # kernels off: fp8_mm emulates
    try:
        assert gemm_path(x, wq, B) == "emulate"
        return fp8_mm(x, wq, ws, B)[0]
    finally:
        triton_fp8.triton = saved


torch.manual_seed(0)
K, N = 300, 200  # 3 K blocks (the last 44 wide), 2 N blocks (the last 72 tall), partial column tiles
x = torch.randn(70, K).pow(3)  # heavy tails: activation scales differ a lot between rows and blocks
x[2, 128:256] = 0  # an all-zero activation tile (scale 1)
w = torch.randn(N, K) * torch.logspace(-3, 1, N)[:, None]  # the two weight row blocks' scales differ
w[:, 128:256] *= 50  # and so do the K blocks
wq, ws = quantize(w, (128, 128))
assert gemm_path(x, wq, B) == "triton" and gemm_path(x, wq, RECIPES["rowwise"]) == "emulate"

# fp32: the float64 reference (scale index per K block and per row block, partial blocks, zero tile)
got = triton_fp8.fp8_linear(x, wq, ws)
ref = reference(x, wq, ws)
err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
assert got.dtype == torch.float32 and err < 1e-6, err

# Rows do not depend on the batch: the first M rows of a batch, and one row alone at tile edges
for m in (1, 5, 64, 65):
    assert torch.equal(triton_fp8.fp8_linear(x[:m], wq, ws), got[:m]), m
for i in (0, 5, 63, 64, 69):
    assert torch.equal(triton_fp8.fp8_linear(x[i : i + 1], wq, ws)[0], got[i]), i

# bf16: the float64 sums rounded once to bf16 (a kernel that truncates instead gives ~half), and the
# emulated path (dequantized operands, fp32 matmul, one rounding): its fp32 sums add the same products in
# another order (the CPU's BLAS picks it), so where the sum cancels or sits near a rounding midpoint the
# two may round to neighbouring bf16 values; never further apart
xb = x.bfloat16()
gb = triton_fp8.fp8_linear(xb, wq, ws)
assert gb.dtype == torch.bfloat16
same = (gb == reference(xb, wq, ws).to(torch.bfloat16)).float().mean().item()
assert same > 0.99, same
em = emulated(xb, wq, ws)
assert (gb == em).float().mean().item() > 0.999
step = torch.finfo(torch.bfloat16).eps * em.float().abs().clamp_min(1e-30)  # one bf16 step, at most
assert ((gb.float() - em.float()).abs() <= step).all()

# The per-card probe's own checks (run here in the interpreter's mode): a probe that fails on a good
# kernel would switch the card to the emulation
assert triton_fp8.probe_error(torch.device("cpu"), "fp32") < 1e-5
assert triton_fp8.probe_preq(torch.device("cpu"), "fp32")

# x quantized first (the large-M and training path): the same bits as quantizing inside the GEMM
for xin in (x, xb):
    xq, xs = quantize(xin, (1, 128))
    pre = triton_fp8.fp8_linear_quantized(xq, xs, wq, ws, xin.dtype)
    assert pre.dtype == xin.dtype and torch.equal(pre, triton_fp8.fp8_linear(xin, wq, ws))
triton_fp8.PREQ_ROWS, saved_rows = 8, triton_fp8.PREQ_ROWS  # fp8_mm switches at 8 rows here
assert torch.equal(fp8_mm(xb, wq, ws, B)[0][:5], fp8_mm(xb[:5], wq, ws, B)[0])
triton_fp8.PREQ_ROWS = saved_rows

# The modules: rollout Fp8Linear (bf16, bias) on the kernel == on the emulation; training mode (master
# weight) gives the rollout forward bit for bit and the straight-through gradients
lin = torch.nn.Linear(K, N)
with torch.no_grad():
    lin.weight.copy_(w * 0.01)
roll = Fp8Linear(copy.deepcopy(lin).bfloat16(), B, train=False, name="l")
xs3 = xb[:9].reshape(3, 3, K)
fast = roll(xs3)
saved, triton_fp8.triton = triton_fp8.triton, None
slow = roll(xs3)
triton_fp8.triton = saved
assert torch.equal(fast, slow)
train = Fp8Linear(copy.deepcopy(lin), B, train=True, name="l")
roll32 = Fp8Linear(copy.deepcopy(lin), B, train=False, name="l")
xt = x[:7].clone().requires_grad_(True)
y = train(xt)
assert torch.equal(y.detach(), roll32(x[:7]))
g = torch.randn(7, N)
(y * g).sum().backward()
w_deq = fake_quant(lin.weight.detach(), (128, 128))
torch.testing.assert_close(xt.grad, g @ w_deq, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(train.weight.grad, g.t() @ fake_quant(x[:7], (1, 128)), rtol=1e-5, atol=1e-4)

# torch.compile (the engine's compiled decode step) traces the layer in one graph, the GEMM as its op
with torch.no_grad():
    compiled = torch.compile(roll, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(xb[:5]), roll(xb[:5]))
print("ok")
"""


@needs_interpreter
def test_dense_fp8_kernel_matches_float64_and_the_emulation_under_the_interpreter():
    run_interpreted(DENSE_CHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(512, 384), (2048, 4096)])  # (K, N): column tiles of 32 and 64
def test_dense_fp8_rows_do_not_depend_on_the_batch_on_cuda(shape):
    """Row i alone == row i in batches of 1, 5, 64, 700 and in a CUDA graph; close to the emulation."""
    from miles_fp8 import triton_fp8
    from miles_fp8.linear import Fp8Linear, gemm_path
    from miles_fp8.quant import RECIPES

    k, n = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    mod = Fp8Linear(lin.cuda().bfloat16(), RECIPES["blockwise"], train=False, name="l")
    x = torch.randn(700, k, device="cuda", dtype=torch.bfloat16)
    assert gemm_path(x, mod.weight, mod.recipe) == "triton", triton_fp8._modes
    with torch.no_grad():
        full = mod(x)
        for m in (1, 5, 64, 700):
            assert torch.equal(mod(x[:m]), full[:m]), m
        for i in (0, 4, 63, 64, 699):
            assert torch.equal(mod(x[i : i + 1])[0], full[i]), i
        static = x[:8].clone()
        graph = torch.cuda.CUDAGraph()
        mod(static)  # warm-up outside the capture
        with torch.cuda.graph(graph):
            captured = mod(static)
        static.copy_(x[100:108])
        graph.replay()
        assert torch.equal(captured, full[100:108])
        saved, triton_fp8.triton = triton_fp8.triton, None  # the emulated path
        try:
            emu = mod(x).float()
        finally:
            triton_fp8.triton = saved
    rel = ((full.float() - emu).norm() / emu.norm()).item()
    same = (full.float() == emu).float().mean().item()
    print(f"shape={shape} rel_vs_emulation={rel:.2e} bitwise_equal_frac={same:.4f} mode={triton_fp8._modes}")
    assert rel < 5e-3 and same > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_cards_pick_exact_products_not_the_bf16_fallback():
    """On an e4m3 card the probe picks a mode whose products are exact: FP8 wgmma where the expert
    kernels stay within 1e-3 of the emulation, else e4m3 codes upcast to fp16 (one conversion
    instruction); bf16 (several instructions per element) only where neither compiles. On an H100 with
    Triton 3.6 the FP8 dot is 9.3e-5 off for the dense tiles; fp16 products are 2.4e-7 off."""
    from miles_fp8 import triton_fp8

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        pytest.skip("no e4m3 tensor cores")
    mode = triton_fp8.device_mode(dev)
    err = triton_fp8.probe_error(dev, mode)
    print(f"mode {mode}, probe error {err:.2e}, fp8 probe error {triton_fp8.probe_error(dev, 'fp8'):.2e}")
    assert mode in ("fp8", "fp16")
    assert err < (1e-3 if mode == "fp8" else 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8acc_products_stay_within_the_probe_bound_and_keep_the_fused_quantization_bits():
    """The opt-in ``fp8acc`` mode (each 128-column block summed in the FP8 tensor core's accumulator, no
    fp32 promotion every k32) compiles for every kernel and tile in use, stays within the probe's 1e-3 of
    the emulation, and the pre-quantized paths give its in-kernel bits: what a bench needs before timing
    it (`--products fp8acc`) and before it may go into the probe's order."""
    from miles_fp8 import triton_fp8

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (9, 0):
        pytest.skip("wgmma (Hopper) only")
    errs = {m: triton_fp8.probe_error(dev, m) for m in ("fp8", "fp8acc")}
    print(f"probe errors {errs}")
    assert errs["fp8acc"] < 1e-3 and triton_fp8.probe_preq(dev, "fp8acc")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception:
        return False
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_fp8_kernels_compile_for_hopper_and_ada_without_a_gpu():
    """Ahead-of-time compile (no GPU needed) of every FP8 kernel variant in use, to cubin for sm_90 and
    sm_89: catches what the interpreter cannot (lowering of the e4m3 dot, fp8 loads, constexpr branches),
    and pins the instruction: 64-row tiles on Hopper's FP8 wgmma, Ada's e4m3 mma.sync."""
    import triton
    from miles_fp8 import triton_experts, triton_fp8
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(fn, sig: dict, consts: dict, arch: int) -> str:
        sig = {**sig, **{k: "constexpr" for k in consts}}
        src = ASTSource(
            fn=fn, signature=sig, constexprs={(list(sig).index(k),): v for k, v in consts.items()}
        )
        kernel = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 3}
        )
        return kernel.asm["ptx"]

    rows_sig = {
        "a_ptr": "*bf16", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "bounds_ptr": "*i32",
        "out_ptr": "*bf16", "rows": "i32", "n_out": "i32", "k_in": "i32", "stride_a": "i32",
        "n_chunks": "i32",
    }  # fmt: skip
    gate_up_sig = {
        "x_ptr": "*bf16", "xs_ptr": "*fp32", "wg_ptr": "*fp8e4nv", "wu_ptr": "*fp8e4nv", "sg_ptr": "*fp32",
        "su_ptr": "*fp32",
        "src_ptr": "*i32", "bounds_ptr": "*i32", "out_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16",
        "hidden": "i32", "inter": "i32", "stride_x": "i32", "stride_s": "i32", "n_chunks": "i32",
    }  # fmt: skip
    for arch in (90, 89):
        fp8_mma = (
            "wgmma.mma_async.sync.aligned.m64n{n}k32.f32.e4m3.e4m3" if arch == 90 else "f32.e4m3.e4m3.f32"
        )
        for block_n in (32, 64):  # dense, x quantized inside the kernel and pre-quantized
            for preq in (False, True):
                sig = dict(rows_sig, a_ptr="*fp8e4nv" if preq else "*bf16")
                consts = {"GROUPED": False, "PREQ": preq, "BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": 128,
                          "MODE": "fp8", "SWAP": False}  # fmt: skip
                assert fp8_mma.format(n=block_n) in build(triton_fp8._fp8_rows_kernel, sig, consts, arch)
        for block_m in (16, 64):  # the experts' down (grouped rows) and gate/up kernels
            swap = triton_fp8.swapped(block_m)
            # a 16-row decode tile multiplies transposed: the 64 weight rows are the wgmma's M, tokens its N
            mma = fp8_mma.format(n=block_m if swap else 64)
            consts = {"GROUPED": True, "PREQ": False, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128,
                      "MODE": "fp8", "SWAP": swap}  # fmt: skip
            assert mma in build(triton_fp8._fp8_rows_kernel, rows_sig, consts, arch)
            for preq in (False, True):  # tokens quantized in the kernel, or e4m3 codes from the fused pass
                sig = dict(gate_up_sig, x_ptr="*fp8e4nv" if preq else "*bf16")
                consts = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "MODE": "fp8",
                          "SAVE": block_m == 64, "SWAP": swap, "PREQ": preq}  # fmt: skip
                assert mma in build(triton_experts._fp8_gate_up_kernel, sig, consts, arch)
    # the training backward's dequantization (e4m3 codes x fp32 tile scales -> bf16, strided output)
    from miles_fp8 import dequant

    deq_sig = {"q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": "*bf16", **dict.fromkeys(
        ("rows", "cols", "tile_r", "tile_c", "s_rows", "s_cols", "stride_qe", "stride_qr", "stride_oe",
         "stride_or"), "i32")}  # fmt: skip
    deq_consts = {"BLOCK_R": dequant.BLOCK_R, "BLOCK_C": dequant.BLOCK_C, "MODE": "cuda"}
    assert "cvt.rn.bf16" in build(dequant._dequant_kernel, deq_sig, deq_consts, 90)
    # and the forward's 128x128 weight quantization (bf16 master weights -> e4m3 codes + block scales)
    from miles_fp8 import triton_blocks

    blk_sig = {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", **dict.fromkeys(
        ("rows", "cols", "stride_xe", "stride_xr", "s_rows", "s_cols"), "i32")}  # fmt: skip
    for arch in (90, 89):  # Hopper converts fp32 -> e4m3 directly; Ada through fp16 (the probe decides)
        ptx = build(triton_blocks._quant_blocks_kernel, blk_sig, {"TB": 128, "MODE": "cuda"}, arch)
        assert "div.rn.f32" in ptx and ("cvt.rn.satfinite.e4m3x2.f32" in ptx or arch == 89)
    # the fp16-products mode (what an H100 picks): e4m3 codes upcast, fp16 wgmma on both tiles
    for block_m, preq in ((16, False), (64, False), (16, True), (64, True)):
        swap = triton_fp8.swapped(block_m)
        consts = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128, "MODE": "fp16", "SAVE": False,
                  "SWAP": swap, "PREQ": preq}  # fmt: skip
        sig = dict(gate_up_sig, x_ptr="*fp8e4nv" if preq else "*bf16")
        ptx = build(triton_experts._fp8_gate_up_kernel, sig, consts, 90)
        down = {"GROUPED": True, "PREQ": preq, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 128,
                "MODE": "fp16", "SWAP": swap}  # fmt: skip
        ptx += build(triton_fp8._fp8_rows_kernel, dict(rows_sig, a_ptr=sig["x_ptr"]), down, 90)
        assert f"wgmma.mma_async.sync.aligned.m64n{block_m if swap else 64}k16.f32.f16.f16" in ptx
