"""The batch-invariant ops of --true-on-policy-mode: a row's result has the same bits alone, in a batch, in
a decode step or in a packed sequence, on 1 and 2 threads; and the model switch keeps the model's state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from miles_core.engine.sequence import graph_safe
from miles_core.model import KVCache, ModelConfig, build_model, make_batch_invariant
from miles_core.model import batch_invariant as bi
from miles_core.model.batch_invariant import InvariantLinear

# (K, N) of every projection of the demo checkpoint (hidden 96, 4 heads / 2 KV heads of 24, expert
# intermediate 96, 8 experts, vocab 303), of a dense MLP of 192 and of the tiny test models.
SHAPES = [(96, 96), (96, 48), (96, 8), (96, 192), (192, 96), (96, 303), (32, 32), (32, 16), (16, 32)]
# K of 192 and more: where MKL takes another kernel for 8 rows (1 thread) and splits small products
# differently over 2 threads (K >= 1024) than bigger ones.
WIDE = [(256, 96), (1024, 8), (1024, 303), (2048, 96)]
THREADS = [1, 2]


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thread")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("k,n", SHAPES + WIDE)
def test_linear_row_is_the_same_alone_and_in_any_batch(threads, k, n):
    g = torch.Generator().manual_seed(k * 1000 + n)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = torch.randn(1100, k, generator=g)
    full = bi.linear(x, w, b)
    for m in [*range(1, 20), 31, 33, 64, 257, 1023]:
        start = (37 * m) % (x.shape[0] - m)
        assert torch.equal(bi.linear(x[start : start + m].clone(), w, b), full[start : start + m]), m
    torch.testing.assert_close(full, F.linear(x, w, b), rtol=1e-5, atol=1e-6 * k)  # fp32 sums of k terms
    assert bi.linear(x[:5].view(1, 5, k), w).shape == (1, 5, n)


def test_silu_mul_rounds_every_element_alike():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4099, generator=g) * 4, torch.randn(4099, generator=g)
    full = bi.silu_mul(x, y)
    alone = torch.stack([bi.silu_mul(x[i : i + 1], y[i : i + 1])[0] for i in range(0, 4099, 7)])
    assert torch.equal(alone, full[::7])
    torch.testing.assert_close(full, F.silu(x) * y, rtol=1e-6, atol=1e-6)


def test_combine_and_row_sum_add_left_to_right():
    # (1e8 + -1e8) + 1 = 1 in fp32, while 1e8 + (-1e8 + 1) = 0: only the left fold gives 1.
    ys = torch.tensor([[[1e8], [-1e8], [1.0]]])
    assert bi.combine(ys, torch.ones(1, 3)).item() == 1.0
    assert bi.combine(ys, torch.tensor([[2.0, 2.0, 0.5]])).item() == 0.5
    assert bi.row_sum(torch.tensor([[1e8, -1e8, 1.0]])).item() == 1.0


def test_token_log_probs_by_hand_and_per_row(threads):
    # log_softmax([0, ln 3]) = [ln 1/4, ln 3/4].
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])
    assert bi.token_log_probs(logits, torch.tensor([1])).item() == pytest.approx(
        torch.log(torch.tensor(0.75)).item()
    )
    g = torch.Generator().manual_seed(1)
    big = torch.randn(5, 50_000, generator=g) * 3
    tgt = torch.randint(0, 50_000, (5,), generator=g)
    full = bi.token_log_probs(big, tgt)
    for i in range(5):
        assert torch.equal(bi.token_log_probs(big[i : i + 1].clone(), tgt[i : i + 1]), full[i : i + 1])


@pytest.mark.parametrize("d", [96, 24, 303])
def test_torch_row_ops_the_mode_relies_on_are_per_row(threads, d):
    # RMSNorm, softmax and log-softmax are used as they are: each row's result must not depend on N.
    g = torch.Generator().manual_seed(d)
    x = torch.randn(700, d, generator=g) * 3
    for op in (lambda t: F.rms_norm(t, (d,), eps=1e-6), lambda t: t.softmax(-1), lambda t: t.log_softmax(-1)):
        full = op(x)
        for m in (1, 2, 3, 5, 9, 64):
            assert torch.equal(op(x[100 : 100 + m].clone()), full[100 : 100 + m]), m


def _qkv(g, rows, t, h=4, hkv=2, d=24):
    return (torch.randn(rows, h, t, d, generator=g), torch.randn(rows, hkv, t, d, generator=g),
            torch.randn(rows, hkv, t, d, generator=g))  # fmt: skip


@pytest.mark.parametrize("d", [24, 8])
def test_attention_query_alone_over_a_cache_equals_it_in_a_packed_sequence(threads, d):
    g = torch.Generator().manual_seed(d)
    t = 2 * bi.KEY_BLOCK + 7  # three key blocks, the last one partial
    q, k, v = _qkv(g, 1, t, d=d)
    whole = bi.attention(q, k, v, torch.arange(t)[None])
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    cache_len = t + 20
    for p in [0, 1, bi.KEY_BLOCK - 1, bi.KEY_BLOCK, bi.KEY_BLOCK + 3, t - 1]:
        # A decode step: one query over a cache whose keys past p hold stale values of another sequence.
        kc, vc = (torch.randn(1, 2, cache_len, d, generator=g) for _ in range(2))
        kc[:, :, : p + 1], vc[:, :, : p + 1] = k[:, :, : p + 1], v[:, :, : p + 1]
        one = bi.attention(
            q[:, :, p : p + 1], kc[:, :, : p + 1 + 5], vc[:, :, : p + 1 + 5], torch.tensor([[p]])
        )
        assert torch.equal(one, whole[:, :, p : p + 1]), p


@pytest.mark.parametrize("h,hkv", [(4, 2), (2, 1), (3, 3)])
def test_attention_decode_row_alone_equals_it_in_a_batch_of_five(threads, h, hkv):
    g = torch.Generator().manual_seed(3)
    q, k, v = _qkv(g, 5, 1, h=h, hkv=hkv)
    keys, vals = (torch.randn(5, hkv, 80, 24, generator=g) for _ in range(2))
    pos = torch.tensor([[3], [70], [31], [32], [0]])
    batch = bi.attention(q, keys, vals, pos)
    for r in range(5):
        n = int(pos[r]) + 1
        alone = bi.attention(q[r : r + 1], keys[r : r + 1, :, :n], vals[r : r + 1, :, :n], pos[r : r + 1])
        assert torch.equal(alone, batch[r : r + 1]), r


def _model(arch: str, **over):
    cfg = tiny_config(64, 2, **over)
    cfg["architectures"] = [arch]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf(cfg)).eval()
    make_batch_invariant(model)
    return model


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen2ForCausalLM"])
def test_model_decode_row_alone_equals_batch_of_five_and_packed_training_forward(threads, arch):
    model = _model(arch, num_hidden_layers=2)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 64, (n,), generator=g) for n in (7, 40, 12, 33, 3)]
    cache = KVCache(model.config, 5, 64)
    with torch.no_grad():
        # Prefill each sequence but its last token, then decode the last tokens together and alone.
        for i, s in enumerate(seqs):
            model(s[None, :-1], position_ids=torch.arange(len(s) - 1)[None], kv_cache=cache,
                  cache_slots=torch.tensor([i]))  # fmt: skip
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([[len(s) - 1] for s in seqs])
        batch = model(last, position_ids=pos, kv_cache=cache, cache_slots=torch.arange(5)).logits[:, 0]
        alone = model(last[1:2], position_ids=pos[1:2], kv_cache=cache, cache_slots=torch.tensor([1]))
        assert torch.equal(alone.logits[:, 0], batch[1:2])
        lens = torch.tensor([len(s) for s in seqs])
        packed = model(torch.cat(seqs)[None], seq_lens=lens.tolist()).logits[0]
        assert torch.equal(packed[lens.cumsum(0) - 1], batch)
        padded = model(torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)).logits
        assert torch.equal(padded[torch.arange(5), lens - 1], batch)


def test_make_batch_invariant_keeps_parameters_ties_and_names():
    cfg = tiny_config(64, 2)
    model = build_model(ModelConfig.from_hf(cfg))
    params = {n: p for n, p in model.named_parameters()}
    assert graph_safe(model)
    keys = list(model.state_dict())
    assert not any(m.batch_invariant for m in model.modules() if hasattr(m, "batch_invariant"))
    assert make_batch_invariant(model) > 0
    assert type(model.lm_head) is InvariantLinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys
    assert all(m.batch_invariant for m in model.modules() if hasattr(m, "batch_invariant"))
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert not graph_safe(model)  # the experts read their row counts on the host: decode stays eager


@pytest.mark.parametrize("k,n", [(96, 96), (96, 48)])
def test_linear_gradients_are_plain_linears(k, n):
    """The chunked product's backward: the gradients of ``F.linear`` (a transposed or swapped product in
    it would train a different model; square shapes would not notice a transpose by their shape)."""
    g = torch.Generator().manual_seed(k + n)
    x, w, b = (torch.randn(*s, generator=g, requires_grad=True) for s in ((75, k), (n, k), (n,)))
    up = torch.randn(75, n, generator=g)
    ours = torch.autograd.grad((bi.linear(x, w, b) * up).sum(), (x, w, b))
    ref = torch.autograd.grad((F.linear(x, w, b) * up).sum(), (x, w, b))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
