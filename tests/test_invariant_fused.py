"""The fused elementwise kernels of --true-on-policy-mode on CUDA (`miles_core.model.invariant_fused`).

On CPU under Triton's interpreter in a fresh process (fp32): each kernel against a float64 reference and
a value worked out by hand, a row (token) alone equals the same row in batches of other sizes and
offsets, and each backward against torch's gradient of an independently written formula. On a GPU
(`gpu` marker) the same in fp32 and bf16, plus the bf16 rounding points: the residual sum is rounded
before the norm, and the normed value before the weight multiply, as eager does.
"""

from __future__ import annotations

import pytest
import torch
from triton_interp import device_script, needs_interpreter, run_interpreted

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Shared by the interpreter and the CUDA checks: `dev` and `dtype` are set before it runs.
CHECKS = r"""
import math, torch
from miles_core.model import invariant_fused as fu, invariant_routing as ro
from miles_core.model.moe import _topk, expert_bounds, expert_order

g = torch.Generator().manual_seed(0)
tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
exact = dtype == torch.float32

def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

def close(got, ref, what):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, (what, err)

def t(*vals):
    return torch.tensor(vals, device=dev, dtype=dtype)

def rms64(x, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)

# add_rms_norm: d below one block, and over two blocks with a partial tail (2500 > 1024 columns)
for d in (24, 2500):
    h, delta, w = rnd(9, d, scale=3.0), rnd(9, d), rnd(d) + 1
    s, out = fu.add_rms_norm(h, delta, w, 1e-6)
    assert torch.equal(s, h + delta), d  # eager's rounded sum
    close(out, w.double() * rms64(s.double(), 1e-6), ("add_rms_norm", d))
    close(fu.add_rms_norm(h, None, w, 1e-6), w.double() * rms64(h.double(), 1e-6), ("rms_norm", d))
    for r, m in [(0, 1), (4, 1), (8, 1), (2, 3), (5, 4)]:
        s1, o1 = fu.add_rms_norm(h[r : r + m].clone(), delta[r : r + m].clone(), w, 1e-6)
        assert torch.equal(s1, s[r : r + m]) and torch.equal(o1, out[r : r + m]), (d, r, m)
    wide = torch.cat([h, h], -1)[:, :d]  # a strided view: the row stride is read, not assumed
    assert torch.equal(fu.add_rms_norm(wide, delta, w, 1e-6)[1], out), d
# by hand: s = [1, 4] + [2, 0] = [3, 4], rms = sqrt(12.5); weight [1, 2] -> [3, 8] / sqrt(12.5)
s, out = fu.add_rms_norm(t(1.0, 4.0), t(2.0, 0.0), t(1.0, 2.0), 0.0)
assert s.tolist() == [3.0, 4.0], s
close(out, torch.tensor([0.8485281374238570, 2.2627416997969520], dtype=torch.float64, device=dev), "hand")

# rope (+ q/k norm): heads of 16 and 24 (half = 12, masked), norm on and off; x a projection's view
for heads, d in [(3, 16), (2, 24)]:
    b, n = 2, 37
    x = rnd(b, n, heads * d).view(b, n, heads, d)
    ang = torch.arange(n, device=dev)[None, :, None].double() * torch.rand(d // 2, generator=g).to(dev)
    ang = torch.cat([ang, ang], -1).expand(b, n, d)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    wq = rnd(d) + 1
    for weight in (None, wq):
        full = fu.rope(x, weight, cos, sin, 1e-6)
        assert full.shape == (b, heads, n, d), full.shape
        xd = x.double() if weight is None else weight.double() * rms64(x.double(), 1e-6)
        xd = xd.transpose(1, 2)
        rot = torch.cat([-xd[..., d // 2 :], xd[..., : d // 2]], -1)
        close(full, xd * cos.double()[:, None] + rot * sin.double()[:, None], ("rope", heads, d))
        for row, p, m in [(1, 0, 1), (1, 36, 1), (0, 5, 4), (1, 31, 2)]:  # decode rows, a prefill chunk
            sl = slice(p, p + m)
            rr = slice(row, row + 1)
            one = fu.rope(x[rr, sl].clone(), weight, cos[rr, sl], sin[rr, sl], 1e-6)
            assert torch.equal(one, full[row : row + 1, :, sl]), (heads, d, row, p)
# by hand: x = [1, 2], cos = 0.6, sin = 0.8 -> [1 * 0.6 - 2 * 0.8, 2 * 0.6 + 1 * 0.8] = [-1, 2]
hand = fu.rope(t(1.0, 2.0).view(1, 1, 1, 2), None, t(0.6, 0.6).view(1, 1, 2), t(0.8, 0.8).view(1, 1, 2), 0.0)
close(hand.reshape(2), torch.tensor([-1.0, 2.0], dtype=torch.float64, device=dev), "rope hand")

# silu_mul: 2500 elements (three programs, a partial last one), elements alone
gate, up = rnd(5, 500, scale=3.0), rnd(5, 500)
full = fu.silu_mul(gate, up)
close(full, torch.nn.functional.silu(gate.double()) * up.double(), "silu_mul")
for r, c in [(0, 0), (2, 23), (4, 499)]:
    assert torch.equal(fu.silu_mul(gate[r : r + 1, c : c + 1].clone(), up[r : r + 1, c : c + 1].clone()),
                       full[r : r + 1, c : c + 1]), (r, c)  # fmt: skip
ln3 = math.log(3.0)  # silu(ln 3) = ln 3 / (1 + 1/3)
hand = torch.tensor([0.0, 1.5 * ln3], dtype=torch.float64, device=dev)
close(fu.silu_mul(t(0.0, ln3), t(5.0, 2.0)), hand, "silu hand")
# swiglu: the halves of one [M, 2I] tensor read in place, the same bits as silu_mul of the copies
hh = rnd(7, 2 * 300, scale=2.0)
assert torch.equal(fu.swiglu(hh), fu.silu_mul(hh[:, :300].contiguous(), hh[:, 300:].contiguous()))
assert torch.equal(fu.swiglu(hh[2:3]), fu.swiglu(hh)[2:3])

# combine: 150 tokens top-3 over 1100 columns (two column blocks), tokens alone or in other batches
n, k, hid = 150, 3, 1100
ys, wts = rnd(n * k, hid), rnd(n, k).abs()
dest = torch.randperm(n * k, generator=g).to(dev, torch.int32)
full = fu.combine(ys, dest, wts)
picked = ys.double()[dest.long()].view(n, k, hid)
close(full, (picked * wts.double()[..., None]).sum(1), "combine")
for sub in ([0], [149], [3, 40, 41], list(range(64, 130))):
    sub = torch.tensor(sub, device=dev)
    rows = dest.view(n, k)[sub].reshape(-1).long()
    mine = fu.combine(ys[rows], torch.arange(len(rows), device=dev, dtype=torch.int32), wts[sub])
    assert torch.equal(mine, full[sub]), sub.tolist()
# by hand: token 0 = 0.5 * ys[1] + 0.25 * ys[0] (dest un-sorts); ys [1, 2], [3, 4]
two = fu.combine(t(1.0, 2.0, 3.0, 4.0).view(2, 2), torch.tensor([1, 0], device=dev), t(0.5, 0.25).view(1, 2))
assert two.tolist() == [[1.75, 2.5]], two
if exact:  # a left fold in routing order: (1e8 + 1) + -1e8 == 0 in fp32, a tree's (1e8 + -1e8) + 1 == 1
    ones, ids = t(1.0, 1.0, 1.0).view(1, 3), torch.tensor([0, 1, 2], device=dev)
    fold = fu.combine(t(1e8, 1.0, -1e8).view(3, 1), ids, ones)
    assert fold.item() == 0.0, fold

# normalize_topk: 150 rows (three programs of 64), k = 3 and 8, fp32 in; rows alone
for k in (3, 8):
    wf = torch.rand(150, k, generator=g).to(dev) + 0.01
    full = ro.normalize_topk(wf, dtype)
    assert full.dtype == dtype
    close(full, wf.double() / wf.double().sum(-1, keepdim=True), ("topk", k))
    for r in (0, 63, 64, 149):
        assert torch.equal(ro.normalize_topk(wf[r : r + 1].clone(), dtype), full[r : r + 1]), (k, r)
close(ro.normalize_topk(torch.tensor([[0.2, 0.3]], device=dev), dtype),
      torch.tensor([[0.4, 0.6]], dtype=torch.float64, device=dev), "topk hand")  # fmt: skip

# route: softmax over E (8, 20 masked to 32, 128), the k largest as moe._topk picks them from the same
# probabilities (ties: the lower expert), renormalised or not; rows alone
for e, k in [(8, 2), (20, 3), (128, 8)]:
    logits = rnd(70, e, scale=2.0)
    logits[5, : e // 2] = logits[5, 0]  # ties
    for norm in (True, False):
        probs, idx, w = ro.route(logits, k, norm, dtype)
        close(probs, torch.softmax(logits.double(), -1), ("route probs", e))
        ref_w, ref_idx = _topk(probs, k)
        assert torch.equal(idx, ref_idx), (e, k)
        raw = probs.double().gather(1, idx)
        close(w, raw / raw.sum(-1, keepdim=True) if norm else raw, ("route w", e, norm))
        if norm:  # routing replay renormalises the same picks with `normalize_topk`: the same bits
            assert torch.equal(ro.normalize_topk(probs.gather(1, idx), dtype), w), e
        for r in (0, 5, 69):
            one = ro.route(logits[r : r + 1].clone(), k, norm, dtype)
            assert all(torch.equal(a, b[r : r + 1]) for a, b in zip(one, (probs, idx, w))), (e, r)
# by hand: softmax([0, ln 2, ln 2, ln 4]) = [1, 2, 2, 4] / 9; top 2: expert 3, then 1 (tie with 2)
probs, idx, w = ro.route(t(0.0, math.log(2), math.log(2), math.log(4)).view(1, 4), 2, True, torch.float32)
assert idx.tolist() == [[3, 1]], idx
close(w, torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64, device=dev), "route hand")

# cache_write: K/V rows (k a transposed view, as rope returns it) land at each row's slot and positions,
# nothing else changes; a decode step (T = 1) and a prefill chunk (T = 5)
for t_len in (1, 5):
    kc, vc = rnd(6, 2, 40, 24), rnd(6, 2, 40, 24)
    k = rnd(3, t_len, 2, 24).transpose(1, 2)
    v = rnd(3, 2, t_len, 24)
    slots = torch.tensor([4, 0, 2], device=dev)
    pos = torch.tensor([7, 0, 33], device=dev)[:, None] + torch.arange(t_len, device=dev)
    want_k, want_v = kc.clone(), vc.clone()
    want_k[slots[:, None], :, pos] = k.transpose(1, 2)
    want_v[slots[:, None], :, pos] = v.transpose(1, 2)
    fu.cache_write(k, v, kc, vc, slots, pos)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), t_len

# expert_order: the permutation, inverse, tokens and bounds of `moe` in one program (integers: equal)
for m, e, k in [(1, 8, 1), (7, 8, 1), (256, 32, 4), (1024, 128, 8), (40, 8, 4)]:
    flat = torch.randint(0, e - 1, (m,), generator=g).to(dev)  # expert e - 1 gets nothing
    if m == 40:
        flat[:] = 3  # every copy on one expert: ties broken by copy index
    order, dest, src, bounds = ro.expert_order(flat, e, k)
    ref_order, ref_dest = expert_order(flat, e)
    assert torch.equal(order, ref_order) and torch.equal(dest, ref_dest), (m, e)
    assert torch.equal(src, (ref_order // k).to(torch.int32)), (m, e)
    assert torch.equal(bounds, expert_bounds(flat, e)), (m, e)
hand = ro.expert_order(torch.tensor([2, 0, 2, 1], device=dev), 3, 2)  # sorted: copies 1, 3, 0, 2
assert [v.tolist() for v in hand] == [[1, 3, 0, 2], [2, 0, 3, 1], [0, 1, 0, 1], [0, 1, 2, 4]], hand
try:
    ro.expert_order(torch.zeros(ro.ORDER_MAX + 1, dtype=torch.long, device=dev), 8, 2)
    raise AssertionError("expert_order took more copies than one program holds")
except ValueError:
    pass

# backward (fp32): every input's gradient, both outputs of add_rms_norm contributing
if exact:
    def grads(fn, ref, xs):
        outs = []
        for f in (fn, ref):
            ins = [(x.double() if f is ref else x).detach().requires_grad_() for x in xs]
            res = f(*ins)
            res = res if isinstance(res, tuple) else (res,)
            probes = [torch.linspace(-1, 2, r.numel(), device=dev).view(r.shape) for r in res]
            sum((r * p.to(r.dtype)).sum() for r, p in zip(res, probes)).backward()
            outs.append([i.grad for i in ins])
        for a, b in zip(*outs):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    h, delta, w = rnd(5, 24), rnd(5, 24), rnd(24) + 1
    grads(lambda a, b, c: fu.add_rms_norm(a, b, c, 1e-6),
          lambda a, b, c: (a + b, c * rms64(a + b, 1e-6)), [h, delta, w])  # fmt: skip
    x, wq = rnd(2, 5, 3, 16), rnd(16) + 1
    ang = torch.rand(2, 5, 8, generator=g).to(dev) * 6
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    def rope_ref(a, b):
        a = (b * rms64(a, 1e-6)).transpose(1, 2)
        rot = torch.cat([-a[..., 8:], a[..., :8]], -1)
        return a * cos.double()[:, None] + rot * sin.double()[:, None]
    grads(lambda a, b: fu.rope(a, b, cos, sin, 1e-6), rope_ref, [x, wq])
    grads(fu.silu_mul, lambda a, b: torch.nn.functional.silu(a) * b, [rnd(4, 7), rnd(4, 7)])
    grads(fu.swiglu, lambda a: torch.nn.functional.silu(a[:, :5]) * a[:, 5:], [rnd(6, 10)])
    dest = torch.randperm(12, generator=g).to(dev)
    grads(lambda a, b: fu.combine(a, dest, b), lambda a, b: (a[dest].view(4, 3, -1) * b[..., None]).sum(1),
          [rnd(12, 9), rnd(4, 3)])  # fmt: skip
    grads(lambda a: ro.normalize_topk(a, dtype), lambda a: a / a.sum(-1, keepdim=True),
          [torch.rand(6, 4, generator=g).to(dev) + 0.1])  # fmt: skip
    x = rnd(6, 8)
    _, idx, _ = ro.route(x, 3, True, dtype)
    def route_ref(a):
        p = torch.softmax(a, -1)
        w = p.gather(1, idx)
        return p, w / w.sum(-1, keepdim=True)
    grads(lambda a: ro.route(a, 3, True, dtype)[::2], route_ref, [x])
"""

# The model in the mode calls the fused kernels, once per op and layer (1 layer: the input norm, the
# post-attention add + norm, the final norm; rope on q and k; the router; the experts' backward its
# SwiGLU; a decode step the cache write); a model out of the mode calls none.
WIRED = r"""
from conftest import tiny_config
from miles_core.model import KVCache, ModelConfig, build_model, make_batch_invariant

calls = {}
names = [(fu, n) for n in ("add_rms_norm", "rope", "silu_mul", "swiglu", "combine", "cache_write")]
for mod, name in names + [(ro, n) for n in ("route", "expert_order", "normalize_topk")]:
    def counted(*a, _fn=getattr(mod, name), _name=name):
        calls[_name] = calls.get(_name, 0) + 1
        return _fn(*a)
    setattr(mod, name, counted)
want = {"Qwen3MoeForCausalLM": {"add_rms_norm": 3, "rope": 2, "combine": 1, "route": 1, "expert_order": 1,
                                "swiglu": 1},
        "Qwen2ForCausalLM": {"add_rms_norm": 3, "rope": 2, "silu_mul": 1}}  # fmt: skip
for arch, expect in want.items():
    cfg = tiny_config(64, 2, num_hidden_layers=1)
    cfg["architectures"] = [arch]
    model = build_model(ModelConfig.from_hf(cfg), dtype=dtype, device=dev)
    ids = torch.randint(3, 64, (2, 5), generator=g).to(dev)
    calls.clear()
    model(ids)
    assert calls == {}, (arch, calls)
    make_batch_invariant(model)
    model(ids).logits.float().square().mean().backward()
    if "swiglu" in calls:  # once per expert in the per-expert loop (CPU, fp32), once grouped
        calls["swiglu"] = min(calls["swiglu"], 1)
    assert calls == expect, (arch, calls)
    calls.clear()
    cache = KVCache(model.config, 2, 16, dtype=dtype, device=dev)
    with torch.no_grad():  # a decode step over the cache also writes K and V through the kernel
        model(ids[:, :1], position_ids=torch.zeros(2, 1, dtype=torch.long, device=dev), kv_cache=cache,
              cache_slots=torch.arange(2, device=dev))  # fmt: skip
    assert calls.get("cache_write") == 1 and cache.k[0][:, :, 0].abs().sum() > 0, (arch, calls)
"""

# bf16 rounding points (CUDA only: the interpreter's fp32 -> bf16 casts truncate): the kernels' outputs
# against the exact value rounded where eager rounds. A missed rounding (the residual sum kept in fp32,
# the normed value not rounded before the weight) moves about a quarter of the outputs by one bf16 step;
# the fp32 rsqrt's own error moves very few.
ROUNDING = r"""
import torch
from miles_core.model import invariant_fused as fu

g = torch.Generator().manual_seed(1)
bf = torch.bfloat16
h = (torch.randn(64, 1024, generator=g) * 3).to(dev, bf)
delta = torch.randn(64, 1024, generator=g).to(dev, bf)
w = (torch.rand(1024, generator=g) + 0.5).to(dev, bf)
s, out = fu.add_rms_norm(h, delta, w, 1e-6)
sd = s.double()
ref = (w.double() * (sd * torch.rsqrt(sd.square().mean(-1, keepdim=True) + 1e-6)).to(bf).double()).to(bf)
assert (out == ref).float().mean().item() > 0.99, (out != ref).float().mean().item()
gate, up = (torch.randn(4096, generator=g) * 3).to(dev, bf), torch.randn(4096, generator=g).to(dev, bf)
gd = gate.double()
den = (1.0 + torch.exp(-gd).to(bf).double()).to(bf).double()
ref = ((gd / den).to(bf).double() * up.double()).to(bf)
assert (fu.silu_mul(gate, up) == ref).float().mean().item() > 0.99
"""


@needs_interpreter
def test_fused_kernels_match_float64_and_give_rows_the_same_bits_in_any_batch_under_the_interpreter():
    run_interpreted(device_script(CHECKS + WIRED, "cpu", "float32"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_kernels_give_rows_the_same_bits_in_any_batch_on_cuda(dtype):
    exec(compile(device_script(CHECKS + WIRED, "cuda", dtype), "checks", "exec"), {})


@pytest.mark.gpu
@gpu
def test_fused_kernels_round_bf16_where_eager_does_on_cuda():
    exec(compile(device_script(ROUNDING, "cuda", "bfloat16"), "rounding", "exec"), {})
