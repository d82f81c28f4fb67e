"""The unified-FP8 training backward (`miles_fp8.train_experts`, `linear.linear_backward`, `dequant`):
grouped GEMMs (``torch._grouped_mm``, which also runs on CPU) against the per-expert fp32 loop (bit for
bit in fp32) and against autograd through an independently written float64 straight-through estimator;
mutations of the maths (the silu' term, gate and up swapped, expert bounds off by one) must fail the
comparison. The Triton dequantization kernel against `quant.dequantize` under the interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from miles_fp8 import train_experts
from miles_fp8.dequant import dequantize_as, dequantize_into
from miles_fp8.linear import backward_dtype, linear_backward
from miles_fp8.quant import RECIPES, dequantize, quantize, quantize_dequantize

from miles_core.api import expert_bounds, expert_order

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PLUGIN_ROOT.parents[1] / "tests"))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402

B = RECIPES["blockwise"]
W, A = B.weight_tile, B.act_tile
E, H, FF, N, K = 5, 256, 192, 40, 2  # H: two 128-column blocks; FF (expert FFN): 1.5 blocks


def _case(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Quantized experts, a routing (expert 4 gets no token), the forward's saved tensors and dys, as
    values of ``dtype`` (held in fp32)."""
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * FF, H, generator=g) * 0.05
    down = torch.randn(E, H, FF, generator=g) * 0.05
    down[:, :, 128:] *= 30  # the down projection's two K blocks get different scales
    (gq, gs), (uq, us), (dq, ds) = (quantize(t, W) for t in (gate_up[:, :FF], gate_up[:, FF:], down))
    idx = torch.stack([torch.randperm(4, generator=g)[:K] for _ in range(N)])
    flat = idx.reshape(-1)
    order, dest = expert_order(flat, E)
    src, bounds = (order // K).to(torch.int32), expert_bounds(flat, E)
    x = torch.randn(N, H, generator=g).to(dtype).float()
    deq = [dequantize(q, s, W) for q, s in ((gq, gs), (uq, us))]
    xs = quantize_dequantize(x, A)[src.long()]
    gate = torch.einsum("mh,mih->mi", xs, deq[0][flat[order]])  # each copy through its expert
    up = torch.einsum("mh,mih->mi", xs, deq[1][flat[order]])
    h = torch.cat([gate, up], 1).to(dtype).float()
    act = (F.silu(gate) * up).to(dtype).float()
    dys = torch.randn(src.numel(), H, generator=g).to(dtype).float()
    return dict(
        dys=dys, x=x, act=act, h=h, src=src, dest=dest, bounds=bounds, weights=(gq, uq, dq, gs, us, ds)
    )


def _reference(c) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 autograd of the STE, written independently: each quantization is a straight-through node
    whose forward value is the FP8 dequantization, each copy runs through its own expert's weights."""
    gq, uq, dq, gs, us, ds = c["weights"]
    wg, wu, wd = (
        dequantize(q, s, W).double().requires_grad_(True) for q, s in ((gq, gs), (uq, us), (dq, ds))
    )
    x = c["x"].double().requires_grad_(True)

    def ste(t, value):  # forward: value, backward: identity
        return t + (value - t).detach()

    xq = ste(x, quantize_dequantize(c["x"], A).double())
    src, bounds = c["src"].long(), c["bounds"].tolist()
    loss = 0.0
    for e in range(E):
        rows = slice(bounds[e], bounds[e + 1])
        if bounds[e] == bounds[e + 1]:
            continue
        xe = xq[src[rows]]
        gate, up = xe @ wg[e].t(), xe @ wu[e].t()
        a = F.silu(gate) * up
        # the forward quantizes the SwiGLU output the kernel rounded (c["act"]); the gradient goes through
        aq = ste(a, quantize_dequantize(c["act"][rows], A).double())
        loss = loss + ((aq @ wd[e].t()) * c["dys"][rows].double()).sum()
    loss.backward()
    return x.grad, torch.cat([wg.grad, wu.grad], 1), wd.grad


def _run(c, fn, dtype=torch.float32, **over):
    c = {**c, **over}
    cast = {k: c[k].to(dtype) for k in ("dys", "x", "act", "h")}
    args = (cast["dys"], cast["x"], cast["act"], cast["h"], c["src"], c["dest"], c["bounds"], c["weights"], B)
    return fn(*args)


def _err(got, want) -> float:
    return max(float((a.double() - b).abs().max() / b.abs().max()) for a, b in zip(got, want))


def test_grouped_backward_equals_the_loop_in_fp32_and_the_float64_ste():
    c = _case()
    ref = _reference(c)
    loop = _run(c, train_experts.looped_backward)
    grouped = _run(c, train_experts.grouped_backward)
    for a, b in zip(grouped, loop):  # the same operations on the same values
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert _err(loop, ref) < 1e-5
    assert grouped[2][4].abs().sum() == 0 and grouped[1][4].abs().sum() == 0  # expert 4: no token
    assert grouped[1][:4].abs().sum() > 0


def test_grouped_backward_in_bf16_is_within_bf16_rounding_of_the_loop():
    c = _case(1, torch.bfloat16)  # the bf16 trainer's inputs
    ref = _reference(c)
    grouped = _run(c, train_experts.grouped_backward, torch.bfloat16)
    loop = _run(c, train_experts.looped_backward, torch.bfloat16)  # fp32 maths on the same bf16 inputs
    assert all(t.dtype == torch.bfloat16 for t in grouped)
    assert _err(grouped, [t.double() for t in loop]) < 2e-2
    assert _err(grouped, ref) < 2e-2  # bf16 operands (weights, activations, dA, [dG | dU]) and results
    rel = [float((a.double() - b).norm() / b.norm()) for a, b in zip(grouped, ref)]
    assert max(rel) < 1e-2, rel  # ~4e-3: about two bf16 roundings (2^-9 each) on the way


def test_needs_skips_gradients_and_empty_batches_give_zeros():
    c = _case()
    for fn in (train_experts.grouped_backward, train_experts.looped_backward):
        full = _run(c, fn)
        args = (c["dys"], c["x"], c["act"], c["h"], c["src"], c["dest"], c["bounds"], c["weights"], B)
        part = fn(*args, needs=(False, True, False))
        assert part[0] is None and part[2] is None and torch.equal(part[1], full[1])
    empty = torch.zeros(0, dtype=torch.int32)
    zero_bounds = torch.zeros(E + 1, dtype=torch.int32)
    for fn in (train_experts.grouped_backward, train_experts.looped_backward):
        none = (c["dys"][:0], c["x"][:0], c["act"][:0], c["h"][:0], empty, empty.long(), zero_bounds)
        dx, dgu, dd = fn(*none, c["weights"], B)
        assert dx.shape == (0, H) and dgu.shape == (E, 2 * FF, H) and dd.shape == (E, H, FF)
        assert dgu.abs().sum() == 0 and dd.abs().sum() == 0


def _drop_silu_prime(h, grad):  # d_gate without the (1 + g (1 - sigmoid(g))) factor
    gate, up = h.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    return torch.cat([grad * up * sig, grad * gate * sig], -1).to(h.dtype)


@pytest.mark.parametrize("mutation", ["silu_prime", "gate_up_swapped", "bounds_off_by_one"])
def test_a_mutated_backward_fails_the_reference(mutation, monkeypatch):
    c = _case()
    ref = _reference(c)
    over = {}
    if mutation == "silu_prime":
        monkeypatch.setattr(train_experts, "swiglu_backward", _drop_silu_prime)
    elif mutation == "gate_up_swapped":
        over["h"] = torch.cat([c["h"][:, FF:], c["h"][:, :FF]], 1)
    else:
        bounds = c["bounds"].clone()
        bounds[2] += 1  # one copy of expert 2 computed as expert 1's
        over["bounds"] = bounds
    for fn in (train_experts.grouped_backward, train_experts.looped_backward):
        assert _err(_run(c, fn, **over), ref) > 1e-2


def test_dense_backward_in_bf16_and_fp32_against_float64():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(70, 320, generator=g), torch.randn(200, 320, generator=g)
    dy = torch.randn(70, 200, generator=g)
    (xq, xs), (wq, ws) = quantize(x, A), quantize(w, W)
    x64, w64 = dequantize(xq, xs, A).double(), dequantize(wq, ws, W).double()
    want = (dy.double() @ w64, dy.double().t() @ x64)
    f32 = linear_backward(dy, xq, xs, wq, ws, None, None, B, torch.float32)
    assert torch.equal(f32[0], dy @ dequantize(wq, ws, W)) and torch.equal(
        f32[1], dy.t() @ dequantize(xq, xs, A)
    )
    assert _err(f32, want) < 1e-5
    b16 = linear_backward(dy.bfloat16(), xq, xs, wq, ws, None, None, B, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in b16) and _err(b16, want) < 2e-2
    emulated = linear_backward(dy, None, None, None, None, x64.float(), w64.float(), B, torch.float32)
    assert torch.equal(emulated[0], f32[0]) and torch.equal(emulated[1], f32[1])
    dx, dw = linear_backward(dy, xq, xs, wq, ws, None, None, B, torch.float32, needs=(True, False))
    assert dw is None and torch.equal(dx, f32[0])
    # bf16 GEMMs only for a bf16 model on CUDA (the --bf16 trainer); CPU keeps fp32
    assert backward_dtype(dy.bfloat16(), torch.bfloat16) == torch.float32


@pytest.mark.parametrize("tile", [(128, 128), (1, 128), (1, 0), (0, 0)])
def test_dequantize_into_a_strided_output_equals_dequantize(tile):
    q, s = quantize(torch.randn(3, 200, 300).pow(3), tile)
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.zeros(3, 2 * 200, 300, dtype=dtype)
        dequantize_into(q, s, tile, buf[:, 200:])
        assert torch.equal(buf[:, 200:], dequantize(q, s, tile).to(dtype)) and buf[:, :200].abs().sum() == 0
    assert torch.equal(dequantize_as(q[1], s[1], tile, torch.float32), dequantize(q[1], s[1], tile))
    with pytest.raises(ValueError, match="out shape"):
        dequantize_into(q, s, tile, torch.empty(3, 200, 301))


DEQUANT_CHECK = """
import torch
from miles_fp8 import dequant
from miles_fp8.quant import dequantize, quantize

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 200, 300, generator=g).pow(3)
x[0, :7] = 0  # all-zero tiles (scale 1)
for tile in ((128, 128), (1, 128), (1, 0)):
    q, s = quantize(x, tile)
    for dtype in (torch.float32, torch.bfloat16):
        assert dequant._kernel_ok(q, torch.empty(0, dtype=dtype))
        buf = torch.zeros(2, 400, 300, dtype=dtype)
        dequant.dequantize_into(q, s, tile, buf[:, 200:])  # the Triton kernel, strided output
        want = dequantize(q, s, tile).to(dtype)  # torch's round-to-nearest-even cast
        assert torch.equal(buf[:, 200:], want), (tile, dtype, (buf[:, 200:] - want).float().abs().max())
        assert buf[:, :200].abs().sum() == 0
        two_d = dequant.dequantize_as(q[1], s[1], tile, dtype)
        assert torch.equal(two_d, want[1]), (tile, dtype)
print("ok")
"""


@needs_interpreter
def test_dequant_kernel_equals_dequantize_under_the_interpreter():
    run_interpreted(f"import sys\nsys.path.insert(0, {str(PLUGIN_ROOT)!r})\n" + DEQUANT_CHECK)


def _to(c: dict, device: str) -> dict:
    return {
        k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)) for k, v in c.items()
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_backward_on_cuda_matches_the_reference_without_a_host_sync():
    c = _case(2, torch.bfloat16)
    cuda = _to(c, "cuda")
    assert train_experts.grouped_ok(cuda["x"].bfloat16(), FF, H)
    _run(cuda, train_experts.grouped_backward, torch.bfloat16)  # warm-up: kernel compiles, probes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host read below raises
    try:
        got = _run(cuda, train_experts.grouped_backward, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got = [t.cpu() for t in got]
    ref = _reference(c)
    assert all(t.dtype == torch.bfloat16 for t in got) and _err(got, ref) < 2e-2
    assert max(float((a.double() - b).norm() / b.norm()) for a, b in zip(got, ref)) < 1e-2
    loop = _run(cuda, train_experts.looped_backward, torch.bfloat16)  # the fp32 loop on the card
    assert _err(got, [t.cpu().double() for t in loop]) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dense_backward_of_a_bf16_model_on_cuda_runs_in_bf16():
    from miles_fp8.linear import Fp8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    mod = Fp8Linear(lin, B, train=True)
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(300, 384, device="cuda", dtype=torch.bfloat16)
    assert backward_dtype(dy, torch.bfloat16) == torch.bfloat16
    mod(x).backward(dy)
    (xq, xs), (wq, ws) = quantize(x.detach().float().cpu(), A), quantize(lin.weight.detach().float().cpu(), W)
    want = (
        dy.double().cpu() @ dequantize(wq, ws, W).double(),
        dy.double().cpu().t() @ dequantize(xq, xs, A).double(),
    )
    got = (x.grad.cpu(), lin.weight.grad.cpu())
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and _err(got, want) < 2e-2
