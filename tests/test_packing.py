"""Packed (unpadded) micro-batches and activation checkpointing change speed only: log-probs, losses,
gradients, recorded and replayed routes equal those of the padded path."""

from __future__ import annotations

import pytest
import torch
from test_trainer import make_args, rollout

from miles_core.loop import make_train_batch
from miles_core.model import RoutingState, load_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer, pack_by_tokens
from miles_core.types import UsageError

PACKED = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "40"]


def _pm():
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})


def _train_grads(ckpt, extra, samples):
    args = make_args(ckpt, extra)
    batch = make_train_batch(samples, args)
    trainer = Trainer(args, _pm(), load_model(ckpt))
    trainer.optimizer.step = lambda: None  # keep weights fixed; compare the accumulated gradient
    metrics = trainer.train(0, batch)[0]
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return grad, metrics, batch


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt, make_args(tiny_ckpt))


def test_pack_by_tokens_respects_budget_and_covers_all():
    lengths = [10, 3, 7, 7, 25, 2, 9, 9, 1]
    bins = pack_by_tokens(lengths, 20)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert sum(lengths[i] for i in b) <= 20 or len(b) == 1  # only an oversize sample exceeds it
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert len(bins) == 4  # 25 | 10 9 1 | 9 7 3 | 7 2 -> first-fit decreasing


@pytest.mark.parametrize("per_token", [False, True])
def test_packed_gradient_equals_padded(tiny_ckpt, samples, per_token):
    extra = ["--calculate-per-token-loss"] if per_token else []
    g_pad, m_pad, _ = _train_grads(tiny_ckpt, ["--micro-batch-size", "2", *extra], samples)
    g_pack, m_pack, _ = _train_grads(tiny_ckpt, [*PACKED, *extra], samples)
    torch.testing.assert_close(g_pack, g_pad, atol=1e-6, rtol=1e-4)
    for key in ("pg_loss", "entropy", "ppo_kl", "train_rollout_logprob_abs_diff"):
        assert m_pack[key] == pytest.approx(m_pad[key], abs=1e-6)


def test_packed_micro_batches_are_unpadded(tiny_ckpt, samples):
    args = make_args(tiny_ckpt, PACKED)
    batch = make_train_batch(samples, args)
    trainer = Trainer(args, _pm(), load_model(tiny_ckpt))
    mbs = list(trainer.micro_batches(batch, list(range(len(batch)))))
    assert sorted(i for mb in mbs for i in mb.index) == list(range(len(batch)))
    for mb in mbs:
        assert mb.input_ids.shape == (1, sum(mb.seq_lens)) and mb.position_ids.shape == mb.input_ids.shape
        assert mb.input_ids.shape[1] <= 40 or len(mb.index) == 1
        assert mb.targets.shape == mb.loss_mask.shape == (sum(mb.lengths),)


def test_packed_log_probs_and_recorded_routes_equal_padded(tiny_ckpt, samples):
    out = []
    for extra in (["--micro-batch-size", "8"], PACKED):
        args = make_args(tiny_ckpt, extra)
        batch = make_train_batch(samples, args)
        batch.record_routes = True
        trainer = Trainer(args, _pm(), load_model(tiny_ckpt))
        out.append((trainer.compute_log_probs(batch, "old"), batch.recorded_routes))
    (lp_a, r_a), (lp_b, r_b) = out
    for a, b in zip(lp_a, lp_b):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(r_a, r_b):
        assert torch.equal(a, b)


def test_packed_replay_routes_are_used_token_by_token(tiny_ckpt, samples):
    """Replay tables whose rows differ token by token: packed and padded micro-batches give the log-probs
    of a plain forward of each sample with its own table (so no row of the table is shifted)."""
    args = make_args(tiny_ckpt, PACKED)
    batch = make_train_batch(samples, args)
    trainer = Trainer(args, _pm(), load_model(tiny_ckpt))
    model = trainer.model
    free = trainer.compute_log_probs(batch, "old")
    e, k, layers = model.config.num_experts, model.config.num_experts_per_tok, model.num_moe_layers
    g = torch.Generator().manual_seed(5)
    # Per token and layer, k distinct experts drawn at random.
    batch.replay_routes = [
        torch.rand(len(t) - 1, layers, e, generator=g).argsort(-1)[..., :k].int() for t in batch.tokens
    ]
    packed = trainer.compute_log_probs(batch, "old")
    args_pad = make_args(tiny_ckpt, ["--micro-batch-size", "8"])
    padded = Trainer(args_pad, _pm(), model).compute_log_probs(batch, "old")
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(free, packed))
    for i, (tokens, s) in enumerate(zip(batch.tokens, batch.samples)):
        routes = batch.replay_routes[i].long()
        with torch.no_grad():
            out = model(
                tokens[:-1][None], routing=RoutingState(replay=[routes[None, :, m] for m in range(layers)])
            )
        n, r = len(tokens) - 1, s.response_length
        logits = out.logits[0, n - r : n] / batch.temperatures[i]  # the temperature it was sampled at
        plain = torch.log_softmax(logits, -1).gather(-1, tokens[n + 1 - r :, None])[:, 0]
        torch.testing.assert_close(packed[i], plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[i], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flag", [["--recompute-granularity", "full"], ["--recompute-activations"]])
def test_activation_checkpointing_keeps_gradient(tiny_ckpt, samples, flag):
    g_ref, _, _ = _train_grads(tiny_ckpt, PACKED, samples)
    g_rc, _, _ = _train_grads(tiny_ckpt, [*PACKED, *flag], samples)
    torch.testing.assert_close(g_rc, g_ref, atol=1e-6, rtol=1e-5)


def test_dynamic_batch_size_needs_token_budget(tiny_ckpt):
    args = make_args(tiny_ckpt, ["--use-dynamic-batch-size"])
    with pytest.raises(UsageError, match="--max-tokens-per-gpu"):
        Trainer(args, _pm(), load_model(tiny_ckpt))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_attention_kernels_match_sdpa_runs():
    """The packed path's kernels, Triton and flash varlen (GQA without repeating K/V), = causal SDPA per
    sequence, values and gradients, in bf16; the Triton kernels are the default where they run."""
    from miles_core.model import layers
    from miles_core.model.config import ModelConfig
    from miles_core.model.layers import Attention, StepContext

    cfg = ModelConfig(
        architecture="Qwen3ForCausalLM", vocab_size=16, hidden_size=256, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    attn = Attention(cfg, 0).cuda()
    lens = [37, 100, 100, 5, 64]
    total = sum(lens)
    cu = torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    ctx = StepContext(cos=None, sin=None, seq_lens=lens, cu_seqlens=cu, max_seqlen=max(lens))
    assert layers.packed_attention_kernel(torch.device("cuda"), 32) == "triton"
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(1, h, total, 32, device="cuda", generator=g, dtype=torch.bfloat16) for h in (8, 2, 2)]
    grad_out = torch.randn(1, 8, total, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    results = []
    kernels = {"triton": layers.varlen_attention.VarlenAttention, "flash": layers._FlashVarlen}
    for name in ("sdpa", "triton", "flash"):
        qkv = [x.clone().requires_grad_() for x in base]
        if name == "sdpa":
            out = attn._packed(*qkv, ctx)
        else:
            out = kernels[name].apply(*(x[0].transpose(0, 1) for x in qkv), cu, max(lens))
            out = out.transpose(0, 1)[None]
        out.backward(grad_out)
        results.append([out.float()] + [x.grad.float() for x in qkv])
    for ours in results[1:]:
        for a, b in zip(results[0], ours):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
