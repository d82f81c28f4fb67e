"""The one-token decode attention op (`miles_core.model.decode_attention`): it writes the new K/V into the
cache and attends over each row's own keys, as masked SDPA over the cache does. The Triton kernel is
checked under Triton's interpreter on CPU (when triton is installed) and on CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from miles_core.model import decode_attention as da

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_interp import needs_interpreter, run_interpreted  # noqa: E402


def _naive(c: dict):
    """Row by row, head by head, in float64: q/k norm, rope, write, then softmax over keys 0..pos."""
    kc, vc = c["k_cache"].clone().double(), c["v_cache"].clone().double()
    h, hkv = c["num_heads"], c["num_kv_heads"]
    b = c["qkv"].shape[0]
    q, k, v = c["qkv"].double().view(b, h + 2 * hkv, -1).split([h, hkv, hkv], dim=1)
    d = q.shape[-1]

    def norm_rope(x, w):
        if w is not None:
            x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + c["eps"]) * w.double()
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = c["cos"].double()[:, None], c["sin"].double()[:, None]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    q, k = norm_rope(q, c["q_norm_w"]), norm_rope(k, c["k_norm_w"])
    out = torch.empty(b, h, d, dtype=torch.float64)
    rep = h // hkv
    for i in range(b):
        s, p = int(c["slots"][i]), int(c["pos"][i])
        kc[s, :, p], vc[s, :, p] = k[i], v[i]
        for j in range(h):
            keys, vals = kc[s, j // rep, : p + 1], vc[s, j // rep, : p + 1]
            out[i, j] = torch.softmax(keys @ q[i, j] / d**0.5, dim=0) @ vals
    return out, kc, vc


def _case(dtype=torch.float32, heads=8, kv_heads=2, d=32, norm=True, seed=0, multi=False) -> dict:
    """Rows of new tokens; ``multi``: four consecutive tokens of each of four sequences (the rows of a
    speculative verify step), which must see each other's keys."""
    g = torch.Generator().manual_seed(seed)
    num_slots, length = 7, 150
    pos = torch.tensor([0, 1, 63, 64, 149])  # empty cache, block edges, the last position
    slots = torch.tensor([6, 0, 3, 2, 5])
    if multi:
        pos = (torch.tensor([10, 0, 61, 146])[:, None] + torch.arange(4)).reshape(-1)  # across block 64
        slots = torch.tensor([6, 0, 3, 2]).repeat_interleave(4)
    b = len(pos)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = pos[:, None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return {
        "qkv": torch.randn(b, (heads + 2 * kv_heads) * d, generator=g).to(dtype),
        "cos": emb.cos().to(dtype), "sin": emb.sin().to(dtype),
        "q_norm_w": (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norm else None,
        "k_norm_w": (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norm else None,
        "eps": 1e-6,
        "k_cache": torch.randn(num_slots, kv_heads, length, d, generator=g).to(dtype),
        "v_cache": torch.randn(num_slots, kv_heads, length, d, generator=g).to(dtype),
        "slots": slots, "pos": pos, "num_heads": heads, "num_kv_heads": kv_heads,
    }  # fmt: skip


@pytest.mark.parametrize("kv_heads,norm,multi", [(2, True, False), (8, True, False), (2, False, False),
                                                  (2, True, True)])  # fmt: skip
def test_reference_path_norms_ropes_writes_and_attends_over_each_rows_keys(kv_heads, norm, multi):
    c = _case(kv_heads=kv_heads, norm=norm, multi=multi)
    want, want_kc, want_vc = _naive(c)
    out = da._reference(**c)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["k_cache"].double(), want_kc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c["v_cache"].double(), want_vc, atol=1e-5, rtol=1e-5)


def test_op_addresses_the_cache_by_key_and_writes_it_in_place():
    from miles_core.model import KVCache, ModelConfig

    c = _case()
    kc, vc = c.pop("k_cache"), c.pop("v_cache")
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    caches = []
    for _ in range(2):
        cache = KVCache(cfg, kc.shape[0], kc.shape[2])
        cache.k[1].copy_(kc), cache.v[1].copy_(vc)
        caches.append(cache)
    want, want_kc, want_vc = _naive({**c, "k_cache": kc, "v_cache": vc})
    args = [c[n] for n in ("qkv", "cos", "sin", "q_norm_w", "k_norm_w", "eps", "slots", "pos")]
    heads = (c["num_heads"], c["num_kv_heads"])
    out = torch.ops.miles.decode_attention(*args, caches[0].key, 1, *heads)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].k[1].double(), want_kc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0].v[1].double(), want_vc, atol=1e-5, rtol=1e-5)
    assert not caches[0].k[0].any()  # other layers untouched
    # Compiled, the call is one opaque op that still writes the cache (and copies none of it).
    fn = torch.compile(lambda *a: torch.ops.miles.decode_attention(*a) * 2, dynamic=False)
    torch.testing.assert_close(fn(*args, caches[1].key, 1, *heads), 2 * out)
    assert torch.equal(caches[1].k[1], caches[0].k[1]) and torch.equal(caches[1].v[1], caches[0].v[1])


CHECK = """
import torch
from miles_core.model import decode_attention as da
import test_decode_attention as t

# float32 only: Triton 3.6's interpreter gets bf16 tl.dot wrong (CUDA checks bf16 below).
for kv_heads, norm, multi in ((2, True, False), (8, True, False), (2, False, False), (2, True, True)):
    c = t._case(torch.float32, kv_heads=kv_heads, norm=norm, multi=multi)
    assert da.kernel_available(c["qkv"], 32)
    want = t._naive(c)
    out = da.attend(**c, multi_token=multi)
    for got, ref in zip((out, c["k_cache"], c["v_cache"]), want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
print("ok")
"""


@needs_interpreter
def test_kernel_matches_under_the_triton_interpreter():
    run_interpreted(CHECK)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_on_cuda():
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        for norm, multi in ((True, False), (False, False), (True, True)):
            c = _case(dtype, heads=16, kv_heads=4, d=64, norm=norm, multi=multi)
            gpu = {n: x.cuda() if isinstance(x, torch.Tensor) else x for n, x in c.items()}
            out = da.attend(**gpu, multi_token=multi).cpu()
            c["k_cache"], c["v_cache"] = gpu["k_cache"].cpu(), gpu["v_cache"].cpu()
            cpu = _case(dtype, heads=16, kv_heads=4, d=64, norm=norm, multi=multi)  # caches before the write
            want, want_kc, want_vc = _naive(cpu)
            torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
            torch.testing.assert_close(c["k_cache"].double(), want_kc, atol=atol, rtol=atol)
            torch.testing.assert_close(c["v_cache"].double(), want_vc, atol=atol, rtol=atol)
