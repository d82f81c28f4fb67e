"""The built-in model's runtime contracts: KV-cache decoding equals the full forward (ragged prefill, q=1
decode, q>1 verification at offsets, overwrite after rejection, prefix copies), routing record / replay
(R3) with router gradient, and module swapping for quantization plugins."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miles_core.model import (
    CausalLM,
    Experts,
    KVCache,
    ModelConfig,
    RoutingState,
    build_model,
    named_hf_tensors,
    swap_modules,
)

VOCAB = 64


def _config(moe: bool = True, norm_topk_prob: bool = True) -> ModelConfig:
    d = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "LlamaForCausalLM"],
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "initializer_range": 0.2,
    }  # fmt: skip
    if moe:
        d.update(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, mlp_only_layers=[1],
                 norm_topk_prob=norm_topk_prob)  # fmt: skip
    return ModelConfig.from_hf(d)


def _model(moe: bool = True, norm_topk_prob: bool = True) -> CausalLM:
    torch.manual_seed(0)
    return build_model(_config(moe, norm_topk_prob)).eval()


def _tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _full(model: CausalLM, seqs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(seqs).logits


def _step(model, cache, slots, tokens, positions) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, position_ids=positions, kv_cache=cache, cache_slots=slots).logits


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("moe", [True, False])
def test_incremental_decoding_matches_full_forward(moe):
    model = _model(moe)
    seqs = _tokens(3, 14)
    ref = _full(model, seqs)
    lens = [5, 2, 7]
    cache = KVCache(model.config, num_slots=5, max_len=16)
    slots = torch.tensor([3, 0, 4])
    # Ragged prefill, right-padded: padded queries sit at positions past each row's length.
    t = max(lens)
    logits = _step(model, cache, slots, seqs[:, :t], torch.arange(t).expand(3, t))
    for b, n in enumerate(lens):
        _close(logits[b, :n], ref[b, :n])
    for _ in range(2):  # q=1 decode steps
        pos = torch.tensor(lens)[:, None]
        logits = _step(model, cache, slots, seqs.gather(1, pos), pos)
        _close(logits[:, 0], ref[torch.arange(3), torch.tensor(lens)])
        lens = [n + 1 for n in lens]
    # q=3 verification step at a different offset per row.
    pos = torch.tensor(lens)[:, None] + torch.arange(3)
    logits = _step(model, cache, slots, seqs.gather(1, pos), pos)
    for b, n in enumerate(lens):
        _close(logits[b], ref[b, n : n + 3])
    # Only the first drafted token is accepted; a different token at the next position overwrites the cache.
    lens = [n + 1 for n in lens]
    alt = seqs.clone()
    pos = torch.tensor(lens)[:, None]
    alt.scatter_(1, pos, (seqs.gather(1, pos) + 1) % VOCAB)
    logits = _step(model, cache, slots, alt.gather(1, pos), pos)
    _close(logits[:, 0], _full(model, alt)[torch.arange(3), torch.tensor(lens)])
    assert (logits[:, 0] - ref[torch.arange(3), torch.tensor(lens)]).abs().max() > 1e-3


def test_copy_slots_shares_a_prompt_prefix():
    model = _model()
    prompt = _tokens(1, 6)
    conts = _tokens(3, 3, seed=2)
    seqs = torch.cat([prompt.expand(3, -1), conts], dim=1)
    ref = _full(model, seqs)
    cache = KVCache(model.config, num_slots=6, max_len=12)
    _step(model, cache, torch.tensor([5]), prompt, torch.arange(6)[None])
    cache.copy_slots(5, torch.tensor([0, 2, 4]), length=6)
    slots = torch.tensor([0, 2, 4])
    logits = _step(model, cache, slots, conts, torch.arange(6, 9).expand(3, 3))
    _close(logits, ref[:, 6:])
    # Pairwise copy (src tensor shaped like dst), then continue one row from its new slot.
    cache.copy_slots(torch.tensor([2]), torch.tensor([1]), length=9)
    logits = _step(model, cache, torch.tensor([1]), seqs[1:2, 8:9], torch.tensor([[8]]))
    _close(logits[0, 0], ref[1, 8])
    cache.reset()
    assert all(float(k.abs().sum()) == 0.0 for k in cache.k)


def test_hidden_is_final_normed_state():
    model = _model()
    out = model(_tokens(2, 5), return_hidden=True)
    assert out.hidden.shape == (2, 5, 32)
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)
    assert model(_tokens(2, 5)).hidden is None


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_routing_record_and_replay(norm_topk_prob):
    model = _model(norm_topk_prob=norm_topk_prob)
    ids = _tokens(2, 7)
    rec = RoutingState()
    with torch.no_grad():
        base = model(ids, routing=rec).logits
    assert model.num_moe_layers == len(rec.router_topk) == len(rec.used_topk) == 2
    for own, used in zip(rec.router_topk, rec.used_topk, strict=True):
        assert own.shape == (2, 7, 2) and own.dtype == torch.long
        assert torch.equal(own, used)
    with torch.no_grad():
        same = model(ids, routing=RoutingState(replay=rec.router_topk)).logits
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)

    # Random distinct experts per token: a different forward, but the router still reports its own choice.
    g = torch.Generator().manual_seed(3)
    rand = [
        torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(14)]).view(2, 7, 2) for _ in range(2)
    ]
    rs = RoutingState(replay=rand)
    logits = model(ids, routing=rs).logits
    assert (logits - base).abs().max() > 1e-3
    assert torch.equal(rs.router_topk[0], rec.router_topk[0])  # first MoE layer sees unchanged inputs
    assert all(torch.equal(u, r) for u, r in zip(rs.used_topk, rand, strict=True))
    logits.pow(2).mean().backward()
    for i in model.config.moe_layer_ids:
        grad = model.model.layers[i].mlp.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_replay_gate_weights_are_router_probabilities_at_replayed_experts(norm_topk_prob):
    """Replaying experts the router would not pick: each token's output is the sum over the replayed
    experts of (softmax router probability there, renormalised over the k when norm_topk_prob) times
    that expert's SwiGLU output; the weights of the router's own top-k play no part."""
    model = _model(norm_topk_prob=norm_topk_prob)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    flat = x.reshape(-1, 32)
    with torch.no_grad():
        probs = torch.softmax(flat @ block.gate.weight.T, dim=-1)
    # Per token a worse-ranked pair (ranks 2 and 4, then 5 and 3): never the router's own top-2.
    ranked = probs.argsort(dim=-1, descending=True)
    replay = torch.stack([ranked[:, 2], ranked[:, 4]], dim=1)
    replay[1::2] = ranked[1::2][:, [5, 3]]
    routing = RoutingState(replay=[replay.view(2, 5, 2)])
    with torch.no_grad():
        out = block(x, routing)
    assert torch.equal(routing.used_topk[0], replay.view(2, 5, 2))
    assert not torch.equal(routing.router_topk[0], routing.used_topk[0])

    gate_up, down, inter = block.experts.gate_up_proj, block.experts.down_proj, block.experts.intermediate
    expected = torch.zeros_like(flat)
    with torch.no_grad():
        for n in range(flat.shape[0]):
            w = probs[n, replay[n]]
            if norm_topk_prob:
                w = w / w.sum()
            for j, e in enumerate(replay[n].tolist()):
                h = gate_up[e] @ flat[n]
                expected[n] += w[j] * (down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    torch.testing.assert_close(out.reshape(-1, 32), expected, atol=1e-6, rtol=1e-5)


def test_routing_replay_rejects_wrong_shape():
    model = _model()
    with pytest.raises(ValueError, match="MoE layer 0"):
        model(_tokens(2, 7), routing=RoutingState(replay=[torch.zeros(2, 6, 2, dtype=torch.long)] * 2))


class TaggedLinear(nn.Linear):
    """Stand-in for a quantized linear: same math, a different class."""


class TaggedExperts(Experts):
    pass


def test_swap_modules_keeps_outputs():
    model = _model()
    ids = _tokens(2, 6)
    with torch.no_grad():
        before = model(ids).logits

    def to_tagged(name: str, mod: nn.Module) -> nn.Module | None:
        if name.endswith("q_proj"):
            new = TaggedLinear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            new.load_state_dict(mod.state_dict())
            return new
        if isinstance(mod, Experts):
            new = TaggedExperts(mod.num_experts, mod.gate_up_proj.shape[2], mod.intermediate)
            new.load_state_dict(mod.state_dict())
            return new
        return None

    names = swap_modules(model, to_tagged)
    assert names == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts",
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.mlp.experts",
    ]  # fmt: skip
    assert isinstance(model.model.layers[2].self_attn.q_proj, TaggedLinear)
    assert isinstance(model.model.layers[0].mlp.experts, TaggedExperts)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert "model.layers.2.mlp.experts.5.down_proj.weight" in dict(named_hf_tensors(model))


def test_tied_embeddings_share_one_parameter():
    cfg = _config(moe=False)
    cfg.tie_word_embeddings = True
    model = build_model(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(named_hf_tensors(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_experts_match_loop_on_cuda():
    torch.manual_seed(0)
    experts = Experts(8, 64, 32).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    x = torch.randn(50, 64, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(7, device="cuda")[:2] for _ in range(50)])  # expert 7 unused
    w = torch.rand(50, 2, device="cuda", dtype=torch.bfloat16)
    fast = experts(x, idx, w)
    ref = Experts(8, 64, 32).to("cuda")
    ref.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    torch.testing.assert_close(fast.float(), ref(x.float(), idx, w.float()), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_forward_and_cache():
    torch.manual_seed(0)
    model = build_model(_config(), dtype=torch.bfloat16, device="cuda").eval()
    seqs = _tokens(3, 10).cuda()
    with torch.no_grad():
        ref = model(seqs).logits.float()
        cache = KVCache(model.config, 3, 16, dtype=torch.bfloat16, device="cuda")
        slots = torch.arange(3, device="cuda")
        pre = model(seqs[:, :6], position_ids=torch.arange(6, device="cuda").expand(3, 6),
                    kv_cache=cache, cache_slots=slots).logits.float()  # fmt: skip
        dec = model(seqs[:, 6:9], position_ids=torch.arange(6, 9, device="cuda").expand(3, 3),
                    kv_cache=cache, cache_slots=slots).logits.float()  # fmt: skip
    assert (torch.cat([pre, dec], 1) - ref[:, :9]).abs().max().item() < 5e-2
