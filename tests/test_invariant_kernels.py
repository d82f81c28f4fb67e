"""The Triton kernels of --true-on-policy-mode on CUDA (`miles_core.model.invariant_kernels`).

On CPU they run under Triton's interpreter in a fresh process (fp32: its bf16 products and casts are not
the GPU's): each kernel against a float64 reference, and the property the mode needs: a row alone equals
the same row in batches of other sizes and offsets (other tiles, other row positions in a tile); a decode
query over a KV cache with stale keys equals the same query in a packed sequence; an expert's copy gives
the same bits whichever other copies its expert got; and a whole model's decode row alone equals the row
in a batch, in a packed and in a padded training forward. On a GPU (`gpu` marker) the same in bf16 and
fp32, plus CUDA graphs capturing the experts.
"""

from __future__ import annotations

import pytest
import torch
from triton_interp import device_script, needs_interpreter, run_interpreted

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Shared by the interpreter and the CUDA checks: `dev` and `dtype` are set before it runs.
CHECKS = r"""
import torch, torch.nn.functional as F
from miles_core.model import invariant_kernels as ik
from miles_core.model.moe import expert_bounds, expert_order

g = torch.Generator().manual_seed(0)
tol = 2e-2 if dtype == torch.bfloat16 else 1e-5

def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dev, dtype)

def close(got, ref, what):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, (what, err)

# linear: K not a multiple of BLOCK_K, N not of BLOCK_N, 3+ row tiles; vs float64, then rows alone
for k, n in [(48, 40), (70, 130)]:
    w, x = rnd(n, k, scale=0.3), rnd(150, k)
    full = ik.linear(x, w)
    close(full, x.double() @ w.double().T, ("linear", k, n))
    for m in [1, 3, 31, 33, 100]:
        for start in (0, 7, 150 - m):
            alone = ik.linear(x[start : start + m].clone(), w)
            assert torch.equal(alone, full[start : start + m]), (k, n, m, start)
    assert ik.linear(x[:6].view(2, 3, k), w).shape == (2, 3, n)

# experts: 8 experts top-2 over 150 tokens (2 programs an expert; expert 0 over 3 chunks; one empty)
E, H, I, K = 8, 48, 40, 2
gu, dn = rnd(E, 2 * I, H, scale=0.3), rnd(E, H, I, scale=0.3)
x = rnd(150, H)
idx = torch.randint(0, E - 1, (150, K), generator=g).to(dev)  # expert E-1 gets nothing
idx[:90, 0] = 0  # expert 0 gets 90+ copies
def run_experts(rows):
    flat = idx[rows].reshape(-1)
    order, dest = expert_order(flat, E)
    ys = ik.experts(x[rows], order // K, expert_bounds(flat, E), gu, dn)
    return ys[dest].view(len(rows), K, H)
rows = torch.arange(150, device=dev)
full = run_experts(rows)
xd, gud, dnd = x.double(), gu.double(), dn.double()
for t in (0, 41, 149):
    for j in range(K):
        e = int(idx[t, j])
        h = xd[t] @ gud[e].T
        ref = (torch.nn.functional.silu(h[:I]) * h[I:]) @ dnd[e].T
        close(full[t, j], ref, ("expert", t, j))
for sub in ([5], [3, 40, 41, 149], list(range(10, 60))):
    sub = torch.tensor(sub, device=dev)
    assert torch.equal(run_experts(sub), full[sub]), sub.tolist()

# attention: GQA 2:1 and 4:1 (and MHA), 3 key blocks (last partial), head dims 16 and 24 (padded to 32)
for h, hkv, d in [(4, 2, 16), (3, 3, 24)]:
    t = 2 * ik.ATTN["BLOCK_N"] + 7
    q, k, v = rnd(2, h, t, d), rnd(2, hkv, t, d), rnd(2, hkv, t, d)
    pos = torch.arange(t, device=dev).expand(2, t)
    whole = ik.attention(q, k, v, pos)
    close(whole, ik._attention_ref(q.double(), k.double(), v.double(), pos), ("attention", h, hkv, d))
    for p in [0, 31, 32, t - 1]:
        # one decode query over a cache whose keys past p hold another sequence's stale values
        kc, vc = rnd(1, hkv, t + 20, d), rnd(1, hkv, t + 20, d)
        kc[:, :, : p + 1], vc[:, :, : p + 1] = k[1:, :, : p + 1], v[1:, :, : p + 1]
        one = ik.attention(q[1:, :, p : p + 1], kc, vc, torch.tensor([[p]], device=dev))
        assert torch.equal(one, whole[1:, :, p : p + 1]), (h, hkv, d, p)
    # a prefill chunk: queries p..p+4 over the cache == the same rows of the whole sequence
    chunk = ik.attention(q[:1, :, 40:45], k[:1], v[:1], pos[:1, 40:45])
    assert torch.equal(chunk, whole[:1, :, 40:45]), (h, hkv, d)
    # a decode batch of 5 sequences at other positions == each alone
    pb = torch.tensor([[3], [70], [31], [32], [0]], device=dev)
    qb, kb, vb = rnd(5, h, 1, d), rnd(5, hkv, 80, d), rnd(5, hkv, 80, d)
    batch = ik.attention(qb, kb, vb, pb)
    for r in range(5):
        n = int(pb[r]) + 1
        alone = ik.attention(qb[r : r + 1], kb[r : r + 1, :, :n], vb[r : r + 1, :, :n], pb[r : r + 1])
        assert torch.equal(alone, batch[r : r + 1]), r

# rms_norm and token_log_probs: one program a row, vs float64, and rows alone
for d in (24, 2500):
    x = rnd(9, d, scale=3.0)
    full = ik.rms_norm(x, 1e-6)
    close(full, F.rms_norm(x.double(), (d,), eps=1e-6), ("rms", d))
    assert full.dtype == torch.float32
    for r in (0, 4, 8):
        assert torch.equal(ik.rms_norm(x[r : r + 1].clone(), 1e-6), full[r : r + 1])
    tgt = torch.randint(0, d, (9,), generator=g).to(dev)
    lp = ik.token_log_probs(x, tgt)
    close(lp, torch.log_softmax(x.double(), -1).gather(-1, tgt[:, None])[:, 0], ("logp", d))
    for r in (0, 4, 8):
        assert torch.equal(ik.token_log_probs(x[r : r + 1].clone(), tgt[r : r + 1]), lp[r : r + 1])
# log_softmax([0, ln 3]) at 1 = ln 3/4
two = torch.tensor([[0.0, 1.0986122886681098]], device=dev, dtype=dtype)
assert abs(ik.token_log_probs(two, torch.tensor([1], device=dev)).item() - (-0.2876820724517809)) < tol
"""

# A whole model on the kernels: decode row alone == in a batch of 3 == packed == padded training forward;
# and gradients flow (torch's gradient of the same function) close to the torch path's.
MODEL = r"""
import copy, torch
from conftest import tiny_config
from miles_core.model import KVCache, ModelConfig, build_model, make_batch_invariant

for arch in ("Qwen3MoeForCausalLM", "Qwen2ForCausalLM"):
    cfg = tiny_config(64, 2, num_hidden_layers=1)
    cfg["architectures"] = [arch]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf(cfg), dtype=dtype, device=dev).eval()
    plain = copy.deepcopy(model)
    make_batch_invariant(model)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 64, (n,), generator=g).to(dev) for n in (7, 40, 3)]
    cache = KVCache(model.config, 3, 64, dtype=dtype, device=dev)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            model(s[None, :-1], position_ids=torch.arange(len(s) - 1, device=dev)[None], kv_cache=cache,
                  cache_slots=torch.tensor([i], device=dev))
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([[len(s) - 1] for s in seqs], device=dev)
        slots = torch.arange(3, device=dev)
        batch = model(last, position_ids=pos, kv_cache=cache, cache_slots=slots).logits[:, 0]
        alone = model(last[1:2], position_ids=pos[1:2], kv_cache=cache, cache_slots=slots[1:2])
        assert torch.equal(alone.logits[:, 0], batch[1:2]), arch
        lens = torch.tensor([len(s) for s in seqs], device=dev)
        packed = model(torch.cat(seqs)[None], seq_lens=lens.tolist()).logits[0]
        assert torch.equal(packed[lens.cumsum(0) - 1], batch), arch
        padded = model(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)).logits
        assert torch.equal(padded[torch.arange(3, device=dev), lens - 1], batch), arch
    if dtype != torch.float32:  # the backward is torch's either way; bf16 rounding would only blur it
        continue
    ids = torch.cat(seqs)[None]
    for m in (model, plain):
        m.train()
        m(ids, seq_lens=[7, 40, 3]).logits.float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4)
"""


@needs_interpreter
def test_kernels_match_float64_and_give_rows_the_same_bits_in_any_batch_under_the_interpreter():
    run_interpreted(device_script(CHECKS, "cpu", "float32"))


@pytest.mark.slow  # ~35 s on a busy 2-core box
@needs_interpreter
def test_model_on_the_kernels_decodes_a_row_as_it_trains_it_under_the_interpreter():
    run_interpreted(device_script(MODEL, "cpu", "float32"))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_give_rows_the_same_bits_in_any_batch_on_cuda(dtype):
    exec(compile(device_script(CHECKS, "cuda", dtype), "checks", "exec"), {})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_on_the_kernels_decodes_a_row_as_it_trains_it_on_cuda(dtype):
    exec(compile(device_script(MODEL, "cuda", dtype), "model", "exec"), {})


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_softmax_is_per_row_on_cuda(dtype):
    # The router's softmax (fp32 over E experts) stays torch's: each row's bits must not depend on N.
    g = torch.Generator().manual_seed(0)
    for e in (8, 32, 128):
        x = (torch.randn(3000, e, generator=g) * 3).to("cuda", dtype).float()
        full = torch.softmax(x, -1)
        for m in (1, 2, 3, 5, 64, 1000):
            assert torch.equal(torch.softmax(x[100 : 100 + m].clone(), -1), full[100 : 100 + m]), (e, m)
