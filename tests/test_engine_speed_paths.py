"""The engine's fast paths give the same outputs as its eager path: the static-shape decode behind CUDA
graphs (run uncaptured on CPU, captured on CUDA), the sync-free sampler flags and the grouped experts."""

from __future__ import annotations

import pytest
import torch

from miles_core.engine import Engine, sample_tokens
from miles_core.engine.cuda_graph import DecodeGraphs, bucket
from miles_core.model import Experts, KVCache, ModelConfig, build_model, load_model

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt).eval()


def _prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def _generate(model, prompts, params, *, graph: bool, capture_routes: bool = True, seed: int = 7):
    engine = Engine(model, None, max_batch_size=8, seed=seed)
    engine._eos = {5}  # a common token: some sequences stop early and free their slot mid-batch
    engine.cuda_graph = graph
    engine.capture_routes = capture_routes
    return engine, engine.generate_batch(prompts, params)


def _assert_same(a, b, atol: float) -> None:
    for x, y in zip(a, b):
        assert x.output_ids == y.output_ids
        assert x.finish_reason == y.finish_reason
        assert max(abs(p - q) for p, q in zip(x.log_probs, y.log_probs)) <= atol
        if x.routed_experts is not None:
            assert (x.routed_experts == y.routed_experts).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_decode_path_matches_eager(model, temperature):
    # 11 prompts on 8 slots: continuous batching refills slots, so rows of free slots are exercised.
    prompts = _prompts(model.config.vocab_size, 11)
    params = {"temperature": temperature, "max_new_tokens": 9}
    _, eager = _generate(model, prompts, params, graph=False)
    engine, fast = _generate(model, prompts, params, graph=True)
    _assert_same(eager, fast, atol=1e-5)
    assert engine._graphs is not None and engine._graphs._graphs  # the static path really ran
    assert all(o.routed_experts.shape[0] == len(p) + len(o.output_ids) - 1 for p, o in zip(prompts, fast))


def test_lowest_free_slot_first_keeps_rows_compact(model):
    engine, _ = _generate(model, _prompts(model.config.vocab_size, 3), {"max_new_tokens": 2}, graph=True)
    rows = {k[0] for k in engine._graphs._graphs}
    assert max(rows) <= 4  # 3 sequences on 8 slots use graph rows of a 4-slot bucket at most


def testbuckets_cover_and_cap():
    assert [bucket(n, 48) for n in (1, 3, 4, 5, 33, 60)] == [1, 4, 4, 8, 48, 48]
    assert bucket(65, 448, 64) == 128 and bucket(300, 448, 64) == 448


def test_graphs_are_dropped_when_weights_move(model, tiny_ckpt):
    m = load_model(tiny_ckpt).eval()
    engine, _ = _generate(m, [[3, 4, 5]], {"max_new_tokens": 2}, graph=True)
    old = engine._graphs
    m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())  # a plugin re-allocates
    engine.generate_batch([[3, 4, 5]], {"max_new_tokens": 2})
    assert engine._graphs is not old


def test_fused_qkv_follows_weight_updates_and_reallocations(tiny_ckpt):
    from miles_core.model import named_hf_tensors
    from miles_core.model.layers import Attention

    m = load_model(tiny_ckpt).eval()
    other = load_model(tiny_ckpt).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts, params = _prompts(m.config.vocab_size, 5), {"temperature": 0.0, "max_new_tokens": 6}
    engine, _ = _generate(m, prompts, params, graph=True)
    attn = next(mod for mod in m.modules() if isinstance(mod, Attention))
    assert attn._qkv is not None and attn.q_proj.weight.data_ptr() == attn._qkv[0].data_ptr()
    # A weight sync copies into the views: the fused buffer sees the new weights.
    engine.update_weights(named_hf_tensors(other), version=1)
    _, want = _generate(other, prompts, params, graph=False)
    _assert_same(engine.generate_batch(prompts, params), want, atol=1e-5)
    # A re-allocated projection (a plugin assigning a new tensor) is fused again, not read stale.
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach().clone())
    _assert_same(engine.generate_batch(prompts, params), want, atol=1e-5)
    assert attn.k_proj.weight.data_ptr() == attn._qkv[0].data_ptr() + attn.q_proj.weight.nbytes


def test_fused_qkv_refuses_a_reallocated_bias():
    from miles_core.model.layers import Attention

    cfg = ModelConfig(
        architecture="Qwen2ForCausalLM", vocab_size=16, hidden_size=32, intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, qkv_bias=True,
    )  # fmt: skip
    attn = Attention(cfg, 0)
    assert attn.fuse_qkv() and attn.v_proj.bias.data_ptr() != attn.q_proj.bias.data_ptr()
    attn.v_proj.bias = torch.nn.Parameter(torch.randn(16))  # a plugin re-allocates one bias
    assert attn.fuse_qkv()
    torch.testing.assert_close(attn._qkv[1][-16:], attn.v_proj.bias.detach())
    assert attn.v_proj.bias.data_ptr() == attn._qkv[1].data_ptr() + 4 * (32 + 16)  # fp32 q and k biases


def test_per_row_key_attention_uses_one_keybucket_and_matches(model, monkeypatch):
    """Where the decode attention op serves (CUDA with triton; here its torch reference path, forced),
    the static step needs no key-length buckets: one compiled/captured step per row bucket."""
    from miles_core.model import decode_attention as da

    prompts = _prompts(model.config.vocab_size, 11)
    params = {"temperature": 0.0, "max_new_tokens": 40}
    _, want = _generate(model, prompts, params, graph=False)  # masked SDPA over bucketed keys
    monkeypatch.setattr(da, "use_for_decode", lambda x, head_dim: True)
    _, eager = _generate(model, prompts, params, graph=False)
    engine, static = _generate(model, prompts, params, graph=True)
    assert engine._graphs.per_row_keys
    assert {key[1] for key in engine._graphs._graphs} == {engine._cache.max_len}
    _assert_same(eager, want, atol=1e-4)
    _assert_same(static, want, atol=1e-4)


def test_sampler_host_flags_match_tensor_checks():
    logits = torch.randn(6, 50)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.0, 1.2, 0.5])
    top_p = torch.tensor([1.0, 0.9, 1.0, 0.5, 1.0, 1.0])
    top_k = torch.tensor([-1, 5, -1, -1, 3, -1])
    a = sample_tokens(logits, temp, top_p, top_k, torch.Generator().manual_seed(1))
    b = sample_tokens(logits, temp, top_p, top_k, torch.Generator().manual_seed(1), use_top_k=True,
                      use_top_p=True)  # fmt: skip
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    exp = probs * counts.sum()
    stat = ((counts.float() - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2.0), stat / 2))


def test_keyed_sampler_draws_the_tempered_distribution_and_is_a_function_of_its_key():
    n, logits = 20000, torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    rows = logits.expand(n, -1)
    temp = torch.full((n,), 0.8)
    keys = torch.randperm(1 << 20, generator=torch.Generator().manual_seed(0))[:n]  # distinct sequences
    index = torch.full((n,), 37)
    tokens, _ = sample_tokens(rows, temp, torch.ones(n), torch.full((n,), -1), None, noise_key=(keys, index))
    probs = torch.softmax(logits / 0.8, -1)
    assert _chi2_pvalue(torch.bincount(tokens, minlength=6), probs) > 0.01
    # The same draw every time for the same (key, index); wrong temperature is detected by the same test.
    again, _ = sample_tokens(rows, temp, torch.ones(n), torch.full((n,), -1), None, noise_key=(keys, index))
    assert torch.equal(tokens, again)
    assert _chi2_pvalue(torch.bincount(tokens, minlength=6), torch.softmax(logits, -1)) < 0.01
    # Consecutive positions of one sequence draw independently of each other.
    seq, _ = sample_tokens(rows, temp, torch.ones(n), torch.full((n,), -1), None,
                           noise_key=(torch.full((n,), 12345), torch.arange(n)))  # fmt: skip
    assert _chi2_pvalue(torch.bincount(seq, minlength=6), probs) > 0.01
    pairs = seq[:-1] * 6 + seq[1:]
    assert _chi2_pvalue(torch.bincount(pairs, minlength=36), torch.outer(probs, probs).reshape(-1)) > 0.01


@pytest.mark.parametrize("m,e", [(1, 4), (16, 8), (256, 32), (1024, 32), (1025, 32), (3000, 32)])
def test_expert_order_is_the_stable_argsort(m, e):
    from miles_core.model.moe import expert_order

    flat = torch.randint(0, e, (m,), generator=torch.Generator().manual_seed(m))
    order, dest = expert_order(flat, e)
    assert torch.equal(order, flat.argsort(stable=True))
    assert torch.equal(order[dest], torch.arange(m))


def test_compiled_router_topk_is_torch_topk():
    from miles_core.model.moe import _topk

    probs = torch.softmax(torch.randn(40, 32, generator=torch.Generator().manual_seed(0)), -1)
    probs[0, 7] = probs[0, 3] = probs[0].max() + 0.1  # a tie: the lower expert ranks first
    fn = torch.compile(lambda p: _topk(p, 4), dynamic=False)
    vals, idx = fn(probs)
    want_vals, want_idx = torch.topk(probs, 4)
    assert torch.equal(vals, want_vals) and torch.equal(idx[1:], want_idx[1:])
    assert idx[0, :2].tolist() == [3, 7]


def test_decode_graphs_rows_are_slots(model):
    cache = KVCache(model.config, 4, 64)
    graphs = DecodeGraphs(model, cache, capture=False)
    with torch.no_grad():
        logits, routes = graphs.run([7, 9], [0, 0], [2, 0])
        ref = model(torch.tensor([[7], [9]])).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert routes.shape == (2, model.num_moe_layers, model.config.num_experts_per_tok)


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@gpu
def test_cuda_graph_decode_matches_eager_bf16(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda").eval()
    prompts = _prompts(model.config.vocab_size, 11)
    params = {"temperature": 0.0, "max_new_tokens": 16}
    _, eager = _generate(model, prompts, params, graph=False)
    engine, fast = _generate(model, prompts, params, graph=True)
    assert engine._graphs.capture and engine._graphs._graphs
    _assert_same(eager, fast, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_cuda_graph_decode_matches_eager_bf16_medium_model(tiny_ckpt):
    from miles_core.model import ModelConfig

    cfg = dict(load_model(tiny_ckpt).config.raw)
    cfg.update(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
               moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4,
               num_hidden_layers=3)  # fmt: skip
    model = build_model(ModelConfig.from_hf(cfg), dtype=torch.bfloat16, device="cuda").eval()
    prompts = _prompts(model.config.vocab_size, 40, seed=1)
    params = {"temperature": 0.0, "max_new_tokens": 24}
    _, eager = _generate(model, prompts, params, graph=False)
    _, fast = _generate(model, prompts, params, graph=True)
    _assert_same(eager, fast, atol=1e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4])
def test_decode_attention_kernel_step_matches_masked_sdpa(tiny_ckpt, dtype, tokens):
    """One decode step over the same prefilled cache, with the kernel and with masked SDPA: same
    logits (to the dtype's rounding) and the same K/V written. Teacher-forced, so a near-tied greedy
    token of this random model cannot make the two runs diverge."""
    from miles_core.model import ModelConfig
    from miles_core.model import decode_attention as da

    cfg = dict(load_model(tiny_ckpt).config.raw)
    cfg.update(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
               moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4)  # fmt: skip
    model = build_model(ModelConfig.from_hf(cfg), dtype=dtype, device="cuda").eval()
    g = torch.Generator().manual_seed(0)
    lens = [1, 5, 63, 64, 65, 130]  # key counts around the kernel's 64-key blocks
    slots = torch.tensor([5, 0, 3, 1, 7, 2], device="cuda")
    cache = KVCache(model.config, 8, 256, dtype, "cuda")
    with torch.no_grad():
        for n, slot in zip(lens, slots.tolist()):
            ids = torch.randint(3, model.config.vocab_size, (1, n), generator=g).cuda()
            pos = torch.arange(n, device="cuda")[None]
            model(ids, position_ids=pos, kv_cache=cache, cache_slots=slots.new_tensor([slot]))
        # `tokens` new tokens a row (4: a speculative verify step, whose rows see each other's keys).
        ids = torch.randint(3, model.config.vocab_size, (len(lens), tokens), generator=g).cuda()
        pos = torch.tensor(lens, device="cuda")[:, None] + torch.arange(tokens, device="cuda")
        caches, logits = [], []
        for enabled in (True, False):
            c = KVCache(model.config, 8, 256, dtype, "cuda")
            for dst, src in zip(c.k + c.v, cache.k + cache.v):
                dst.copy_(src)
            da.ENABLED = enabled
            try:
                logits.append(model(ids, position_ids=pos, kv_cache=c, cache_slots=slots).logits.float())
            finally:
                da.ENABLED = True
            caches.append(c)
    if dtype == torch.float32:
        torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    else:  # two bf16 attention kernels round differently: compare relative error over all logits
        assert ((logits[0] - logits[1]).norm() / logits[1].norm()).item() < 3e-2
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        else:  # layer 1's K/V inherit layer 0's attention rounding (and k_norm scales it up)
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.gpu
@gpu
def test_grouped_experts_under_autocast_match_loop_with_grads():
    torch.manual_seed(0)
    experts = Experts(8, 64, 32).cuda()
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x = torch.randn(50, 64, device="cuda", requires_grad=True)
    idx = torch.stack([torch.randperm(8, device="cuda")[:2] for _ in range(50)])
    w = torch.rand(50, 2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = experts(x, idx, w)  # fp32 input under autocast takes the grouped bf16 kernel
    fast.square().sum().backward()
    g_fast = experts.gate_up_proj.grad.clone()
    experts.zero_grad()
    ref = experts(x.detach(), idx, w)
    ref.square().sum().backward()
    torch.testing.assert_close(fast.float(), ref, atol=5e-2, rtol=5e-2)
    g_ref = experts.gate_up_proj.grad
    assert ((g_fast - g_ref).norm() / g_ref.norm()).item() < 3e-2  # bf16 rounding, not a wrong gradient


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compiled_cuda_graph_decode_matches_eager_bf16(tiny_ckpt, temperature):
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda").eval()
    prompts = _prompts(model.config.vocab_size, 11)
    params = {"temperature": temperature, "max_new_tokens": 16}
    _, eager = _generate(model, prompts, params, graph=False)
    engine = Engine(model, None, max_batch_size=8, seed=7)
    engine._eos = {5}
    engine.cuda_graph = engine.compile = engine.capture_routes = True
    fast = engine.generate_batch(prompts, params)
    assert engine._graphs.capture and engine._graphs.compile and engine._graphs._graphs
    if temperature == 0:
        _assert_same(eager, fast, atol=1e-3)
    else:  # fused kernels round differently, so a near-tie may flip: compare the first tokens only
        assert sum(e.output_ids[0] == f.output_ids[0] for e, f in zip(eager, fast)) >= len(prompts) - 1


def test_compiled_static_step_matches_eager_on_cpu(model):
    prompts = _prompts(model.config.vocab_size, 5)
    params = {"temperature": 0.0, "max_new_tokens": 6}
    _, eager = _generate(model, prompts, params, graph=False)
    engine = Engine(model, None, max_batch_size=8, seed=7)
    engine._eos = {5}
    engine.cuda_graph = engine.compile = engine.capture_routes = True
    fast = engine.generate_batch(prompts, params)
    assert engine._graphs.compile
    _assert_same(eager, fast, atol=1e-4)


@pytest.mark.parametrize("graph", [False, True])
def test_a_request_needing_a_longer_cache_waits_for_idle_and_matches(model, graph):
    """A request that arrives mid-batch and needs a longer cache is admitted once the engine is idle
    (the cache grows then); with a step in flight the others keep decoding meanwhile."""
    import asyncio

    async def run(engine):
        params = {"temperature": 0, "max_new_tokens": 6}
        first = [asyncio.ensure_future(engine.generate([3, 4, 5 + i], params)) for i in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)  # let the scheduler start decoding them
        late = await engine.generate([7, 8], {"temperature": 0, "max_new_tokens": 90})
        return [await f for f in first] + [late]

    outs = {}
    for g in (False, graph):
        engine = Engine(model, None, max_batch_size=4, seed=3)
        engine._eos = set()
        engine.cuda_graph = g
        outs[g] = asyncio.run(run(engine))
        assert engine.kv_cache.max_len >= 92
    assert [o.output_ids for o in outs[False]] == [o.output_ids for o in outs[graph]]
    assert [len(o.output_ids) for o in outs[graph]] == [6, 6, 6, 90]
