"""The Triton backward of the batch-invariant attention (`miles_core.model.invariant_attn_grad`).

On CPU under Triton's interpreter in a fresh process (fp32): dq/dk/dv against autograd of an independently
written float64 masked attention (GQA 1:1, 2:1 and 4:1, several sequences, T and L off the block sizes,
head sizes 64 and 24, training rows, decode rows over a longer cache, positions with gaps and repeats),
a case worked out by hand, and the forward's output with the log-sum-exp bit for bit the forward's
without it. On a GPU (`gpu` marker) the same in fp32 and bf16, plus a bench-sized shape against the torch
path's gradients and two backward runs giving the same bits.
"""

from __future__ import annotations

import pytest
import torch
from triton_interp import device_script, needs_interpreter, run_interpreted

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Shared by the interpreter and the CUDA checks: `dev` and `dtype` are set before it runs.
CHECKS = r"""
import math, torch
from miles_core.model import batch_invariant, invariant_kernels as ik

torch.set_num_threads(1)
g0 = torch.Generator().manual_seed(0)
tol = 2e-2 if dtype == torch.bfloat16 else 1e-5

def torch_path_unused(*a):
    raise AssertionError("the backward recomputed the forward in torch")
ik._attention_ref, torch_ref = torch_path_unused, ik._attention_ref

def rnd(*shape):
    return torch.randn(*shape, generator=g0).to(dev, dtype)

def ref64(q, k, v, pos):
    # each query head h reads KV head h // rep; query t sees keys 0..pos[t]
    rep = q.shape[1] // k.shape[1]
    heads = torch.arange(q.shape[1], device=q.device) // rep
    s = torch.einsum("ghtd,ghld->ghtl", q, k[:, heads]) / math.sqrt(q.shape[-1])
    seen = torch.arange(k.shape[2], device=q.device)[None, None, None, :] <= pos[:, None, :, None]
    s = s.masked_fill(~seen, float("-inf"))
    return torch.einsum("ghtl,ghld->ghtd", s.softmax(-1), v[:, heads]), s.logsumexp(-1)

def close(got, ref, what, tol=tol):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, (what, err)

def grads(q, k, v, pos, do):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = ik.attention(*xs, pos)
    assert type(out.grad_fn).__name__ == "AttentionBackward", out.grad_fn
    out.backward(do)
    return out, [x.grad for x in xs]

# by hand (D = 1, scale 1): q = [1, 1], k = [0, ln 3], v = [2, 6], dO = [1, 1]; query 0 sees both keys,
# query 1 key 0 only. Row 0: p = [1/4, 3/4], o = 5, lse = ln 4, delta = 5, dS = p (v - 5) = [-3/4, 3/4],
# dq = dS . k = 3/4 ln 3. Row 1: p = [1, 0], o = 2, lse = 0, dS = 0. dk = dS^T q = [-3/4, 3/4],
# dv = P^T dO = [1/4 + 1, 3/4].
def col(*vals):
    return torch.tensor(vals, device=dev, dtype=dtype).view(1, 1, -1, 1)
pos = torch.tensor([[1, 0]], device=dev)
out, lse = ik._attention_fwd(col(1.0, 1.0), col(0.0, math.log(3)), col(2.0, 6.0), pos, True)
out2, (dq, dk, dv) = grads(col(1.0, 1.0), col(0.0, math.log(3)), col(2.0, 6.0), pos, col(1.0, 1.0))
assert torch.equal(out, out2)
f64 = lambda *vals: torch.tensor(vals, device=dev, dtype=torch.float64)
close(out.view(2), f64(5.0, 2.0), "hand out")
close(lse.view(2), f64(math.log(4), 0.0), "hand lse")
close(dq.view(2), f64(0.75 * math.log(3), 0.0), "hand dq")
close(dk.view(2), f64(-0.75, 0.75), "hand dk")
close(dv.view(2), f64(1.25, 0.75), "hand dv")

# (G, H, Hkv, T, L, D, positions): BLOCK_M 64 / BLOCK_N 64 and 32 split rows and keys unevenly
cases = [
    (2, 4, 2, 45, 45, 64, "train"),  # rep 2: 90 rows over two row tiles
    (2, 3, 3, 37, 70, 24, "gaps"),  # rep 1, head size 24 (padded to 32), keys past every query
    (1, 8, 2, 5, 80, 16, "gaps"),  # rep 4: a prefill chunk's rows at scattered positions
    (3, 2, 1, 1, 70, 32, "decode"),  # decode rows over a cache: stale keys past pos get zero grads
    (1, 2, 2, 100, 130, 32, "split"),  # row tile 0 reaches key 64 exactly, tile 1 the last key
]
if dev == "cuda":
    cases.append((2, 16, 4, 300, 300, 128, "train"))
for G, H, HKV, T, L, D, kind in cases:
    if kind == "train":
        pos = torch.arange(T).expand(G, T)
    elif kind == "decode":
        pos = torch.tensor([[0], [33], [64]])
    elif kind == "split":
        pos = torch.cat([torch.randint(0, 64, (1, 64), generator=g0), torch.randint(0, L, (1, T - 64),
                         generator=g0)], 1)
        pos[0, 10], pos[0, 99] = 64, L - 1
    else:
        pos = torch.randint(0, L, (G, T), generator=g0)
        pos[:, 0], pos[:, 1], pos[-1, 2] = 0, 3, L - 1  # a row seeing key 0 only; the last key
        pos[0] = pos[0].clamp(max=L // 2)  # sequence 0: its queries see a prefix only
    pos = pos.to(dev)
    q, k, v, do = rnd(G, T, H, D).transpose(1, 2), rnd(G, HKV, L, D), rnd(G, HKV, L, D), rnd(G, T, H, D)
    do = do.transpose(1, 2)  # strided, as q
    what = (G, H, HKV, T, L, D, kind)
    out, lse = ik._attention_fwd(q, k, v, pos, True)
    assert torch.equal(out, ik._attention_fwd(q, k, v, pos)), what  # the log-sum-exp leaves out alone
    got, (dq, dk, dv) = grads(q, k, v, pos, do)
    assert torch.equal(got, out), what
    xd = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = ref64(*xd, pos)
    ref.backward(do.double())
    close(out, ref.detach(), ("out",) + what)
    close(lse, ref_lse.detach(), ("lse",) + what)
    for name, a, b in zip("qkv", (dq, dk, dv), xd):
        assert a.dtype == dtype and a.shape == b.shape, (name, what)
        close(a, b.grad, ("d" + name,) + what)
    unseen = torch.arange(L, device=dev)[None, :] > pos.max(1).values[:, None]  # keys no query sees
    assert (dk.abs().sum(-1) * unseen[:, None]).sum() == 0 and (dv.abs().sum(-1) * unseen[:, None]).sum() == 0
    if dev == "cuda":  # deterministic: the same bits again; within bf16 of torch's gradient
        assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), grads(q, k, v, pos, do)[1])), what
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        torch_ref(*xs, pos).backward(do)
        for name, a, b in zip("qkv", (dq, dk, dv), xs):
            close(a, b.grad.double(), ("vs torch", name) + what, max(tol, 1e-4))  # fp32 SDPA's own error

# only the inputs that need it get a gradient; no grad mode runs the forward alone
q, k, v = rnd(1, 2, 9, 16).requires_grad_(), rnd(1, 1, 9, 16), rnd(1, 1, 9, 16)
pos = torch.arange(9, device=dev)[None]
ik.attention(q, k, v, pos).sum().backward()
assert q.grad is not None and q.grad.abs().sum() > 0
with torch.no_grad():
    assert ik.attention(q, k, v, pos).grad_fn is None
# what the model calls in the mode (`batch_invariant.attention`) is this backward
assert type(batch_invariant.attention(q, k, v, pos).grad_fn).__name__ == "AttentionBackward"
"""


@needs_interpreter
def test_attention_backward_matches_float64_autograd_under_the_interpreter():
    run_interpreted(device_script(CHECKS, "cpu", "float32"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_backward_matches_float64_and_the_torch_path_on_cuda(dtype):
    exec(compile(device_script(CHECKS, "cuda", dtype), "checks", "exec"), {})


def _ptxas_available() -> bool:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_attention_backward_compiles_for_hopper_on_wgmma_within_shared_memory():
    """AOT compile for sm_90 (no GPU; ~20 s with a cold Triton cache): bf16 at head sizes 64 and 128, the
    backward kernels on wgmma tensor-core products and every kernel (the forward keeping its log-sum-exp
    too) within an H100's 227 KiB of shared memory a block. The forward with the log-sum-exp store keeps
    every floating-point instruction of the one without it (it only adds the log's): the output's
    arithmetic is the same code (the GPU test compares the bits)."""
    import re
    from collections import Counter

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from miles_core.model import invariant_attn_grad as ag
    from miles_core.model import invariant_kernels as ik

    WGMMA = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16"
    FLOAT_OP = r"^\s*((?:add|sub|mul|fma|div|rcp|ex2|lg2|max|min|cvt)[\w.]*f(?:32|16))\b"
    typed = {"pos_ptr": "*i32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "sm_scale": "fp32"}

    def build(fn, cfg, block_d):
        consts = {k: v for k, v in cfg.items() if k.isupper()} | {"PREC": None, "BLOCK_D": block_d}
        sig = {a: "constexpr" if a in consts else typed.get(a, "*bf16" if a.endswith("_ptr") else "i32")
               for a in fn.arg_names}  # fmt: skip
        at = {(list(sig).index(k),): v for k, v in consts.items()}
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        src = ASTSource(fn=fn, signature=sig, constexprs=at)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)

    def float_ops(ptx: str) -> Counter:
        return Counter(re.findall(FLOAT_OP, ptx, re.M))

    kernels = [(ag._bwd_q_kernel, ag.BWD_Q, True), (ag._bwd_kv_kernel, ag.BWD_KV, True),
               (ik._attention_kernel, ik.ATTN | {"STORE_LSE": True}, False)]  # fmt: skip
    for block_d in (64, 128):
        for fn, cfg, wgmma in kernels:
            out = build(fn, cfg, block_d)
            assert out.metadata.shared <= 227 * 1024, (fn.__name__, block_d, out.metadata.shared)
            found = set(re.findall(WGMMA, out.asm["ptx"]))
            assert bool(found) == wgmma, (fn.__name__, block_d, found)
        plain = float_ops(build(ik._attention_kernel, ik.ATTN | {"STORE_LSE": False}, block_d).asm["ptx"])
        with_lse = float_ops(build(ik._attention_kernel, ik.ATTN | {"STORE_LSE": True}, block_d).asm["ptx"])
        assert plain and not plain - with_lse, (block_d, plain - with_lse)
