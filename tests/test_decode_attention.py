"""The one-token decode attention op (`miles_core.model.decode_attention`): it writes the new K/V into the
cache and attends over each row's own keys, as masked SDPA over the cache does. The Triton kernel is
checked under Triton's interpreter on CPU (when triton is installed) and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from miles_core.model import decode_attention as da

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fused_moe import _interpreter_usable  # noqa: E402


def _naive(q, k, v, kc, vc, slots, pos):
    """Row by row, head by head, in float64: write, then softmax over keys 0..pos."""
    kc, vc = kc.clone().double(), vc.clone().double()
    out = torch.empty(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        s, p = int(slots[b]), int(pos[b])
        kc[s, :, p], vc[s, :, p] = k[b].double(), v[b].double()
        for h in range(q.shape[1]):
            keys, vals = kc[s, h // rep, : p + 1], vc[s, h // rep, : p + 1]
            w = torch.softmax(keys @ q[b, h].double() / q.shape[-1] ** 0.5, dim=0)
            out[b, h] = w @ vals
    return out, kc, vc


def _case(dtype=torch.float32, heads=8, kv_heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, num_slots, length = 5, 7, 150
    kc = torch.randn(num_slots, kv_heads, length, d, generator=g).to(dtype)
    vc = torch.randn(num_slots, kv_heads, length, d, generator=g).to(dtype)
    q = torch.randn(b, heads, d, generator=g).to(dtype)
    k = torch.randn(b, kv_heads, d, generator=g).to(dtype)
    v = torch.randn(b, kv_heads, d, generator=g).to(dtype)
    slots = torch.tensor([6, 0, 3, 2, 5])
    pos = torch.tensor([0, 1, 63, 64, 149])  # empty cache, block edges, the last position
    return q, k, v, kc, vc, slots, pos


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_reference_path_writes_the_cache_and_attends_over_each_rows_keys(kv_heads):
    q, k, v, kc, vc, slots, pos = _case(kv_heads=kv_heads)
    want, want_kc, want_vc = _naive(q, k, v, kc, vc, slots, pos)
    out = da._reference(q, k, v, kc, vc, slots, pos)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc.double(), want_kc)
    torch.testing.assert_close(vc.double(), want_vc)


def test_op_addresses_the_cache_by_key_and_writes_it_in_place():
    from miles_core.model import KVCache, ModelConfig

    q, k, v, kc, vc, slots, pos = _case()
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16)  # fmt: skip
    cache = KVCache(cfg, kc.shape[0], kc.shape[2])
    cache.k[1].copy_(kc), cache.v[1].copy_(vc)
    want, want_kc, want_vc = _naive(q, k, v, kc, vc, slots, pos)
    out = torch.ops.miles.decode_attention(q, k, v, slots, pos, cache.key, 1)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.k[1].double(), want_kc)
    torch.testing.assert_close(cache.v[1].double(), want_vc)
    assert not cache.k[0].any()  # other layers untouched
    # Compiled, the call is one opaque op that still writes the cache (and copies none of it).
    fresh = KVCache(cfg, kc.shape[0], kc.shape[2])
    fresh.k[1].copy_(kc), fresh.v[1].copy_(vc)
    fn = torch.compile(lambda *a: torch.ops.miles.decode_attention(*a) * 2, dynamic=False)
    torch.testing.assert_close(fn(q, k, v, slots, pos, fresh.key, 1), 2 * out)
    assert torch.equal(fresh.k[1], cache.k[1]) and torch.equal(fresh.v[1], cache.v[1])


CHECK = """
import torch
from miles_core.model import decode_attention as da
import test_decode_attention as t

# float32 only: Triton 3.6's interpreter gets bf16 tl.dot wrong (CUDA checks bf16 below).
for dtype, atol in ((torch.float32, 1e-5),):
    for kv_heads in (2, 8):
        q, k, v, kc, vc, slots, pos = t._case(dtype, kv_heads=kv_heads)
        want, want_kc, want_vc = t._naive(q, k, v, kc, vc, slots, pos)
        assert da.kernel_available(q, 16)
        out = da.attend(q, k, v, kc, vc, slots, pos)
        torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
        torch.testing.assert_close(kc.double(), want_kc, atol=atol, rtol=atol)
        torch.testing.assert_close(vc.double(), want_vc, atol=atol, rtol=atol)
print("ok")
"""


@pytest.mark.skipif(not _interpreter_usable(), reason="needs triton (and numpy < 2.3 for its interpreter)")
def test_kernel_matches_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_on_cuda():
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        q, k, v, kc, vc, slots, pos = (x.cuda() for x in _case(dtype, heads=16, kv_heads=4, d=64))
        want, want_kc, want_vc = _naive(*(x.cpu() for x in (q, k, v, kc, vc, slots, pos)))
        out = da.attend(q, k, v, kc, vc, slots, pos)
        torch.testing.assert_close(out.double().cpu(), want, atol=atol, rtol=atol)
        torch.testing.assert_close(kc.double().cpu(), want_kc, atol=atol, rtol=atol)
        torch.testing.assert_close(vc.double().cpu(), want_vc, atol=atol, rtol=atol)
