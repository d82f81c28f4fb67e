"""Speculative decoding in the built-in engine: greedy identity, exact sampling (chi-square against the
target's own distribution), draft-cache bookkeeping, route capture and per-sample spec_info."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from miles_specrl.drafters import MTPDrafter
from miles_specrl.mtp import embed, head_logits, step_context
from miles_specrl.speculator import target_probs
from specrl_helpers import engine, model_speculator, mtp_speculator, tiny_model, with_mtp

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [1, 2, 3]]


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_tokens_and_logprobs_match_plain_decoding(moe):
    model = with_mtp(tiny_model(moe=moe))
    params = {"temperature": 0, "max_new_tokens": 13}
    plain = engine(copy.deepcopy(model), 8)
    plain.capture_routes = moe
    ref = plain.generate_batch(PROMPTS, params)
    spec_engine = engine(copy.deepcopy(model), 8, spec=mtp_speculator(3))
    spec_engine.capture_routes = moe
    out = spec_engine.generate_batch(PROMPTS, params)
    for a, b in zip(ref, out):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-4, rtol=0)
        if moe:
            assert b.routed_experts.shape == a.routed_experts.shape
            assert (b.routed_experts == a.routed_experts).mean() > 0.99


def test_draft_model_equal_to_target_accepts_every_draft():
    model = tiny_model()
    spec = model_speculator(copy.deepcopy(model), k=3)
    ref = engine(copy.deepcopy(model), 8).generate_batch(PROMPTS, {"temperature": 0, "max_new_tokens": 13})
    out = engine(copy.deepcopy(model), 8, spec=spec).generate_batch(
        PROMPTS, {"temperature": 0, "max_new_tokens": 13}
    )
    assert [o.output_ids for o in out] == [o.output_ids for o in ref]
    assert spec.totals.accepted == spec.totals.drafted > 0
    # 12 tokens after the first: three full steps of 4 tokens each.
    assert spec.totals.emitted / spec.totals.steps == 4.0
    info = out[0].spec_info
    assert info["spec_accept_rate"] == 1.0 and info["spec_accept_length"] == 4.0


def test_generate_function_copies_spec_info_onto_the_sample():
    import argparse
    import asyncio

    from miles_core.rollout.generate import RolloutContext, rollout_context, single_turn
    from miles_core.types import Sample

    model = tiny_model()
    spec = model_speculator(copy.deepcopy(model), 3)
    eng = engine(copy.deepcopy(model), 4, spec=spec)

    class _Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    with rollout_context(RolloutContext(engine=eng, tokenizer=_Tok(), pm=None)):
        sample = asyncio.run(
            single_turn(
                argparse.Namespace(), Sample(tokens=list(PROMPTS[1])), {"temperature": 0, "max_new_tokens": 9}
            )
        )
    assert sample.response_length == 9
    assert sample.spec_info["spec_accept_rate"] == 1.0 and sample.spec_info["spec_verify_steps"] == 2.0


def test_mtp_draft_sees_exactly_what_training_computes(monkeypatch):
    """Each step's first draft distribution equals depth 1 of the MTP head run over the final sequence
    without any cache: the pending-entry bookkeeping loses or repeats nothing."""
    model = with_mtp(tiny_model(seed=2))
    seen = []
    orig = MTPDrafter.first

    def spy(self, eng, rows):
        logits, carry, last = orig(self, eng, rows)
        # Row i is slot i; rows of free slots are dummies.
        seen.extend((tuple(s.prompt), int(last[s.slot]), logits[s.slot].clone()) for s in eng._running)
        return logits, carry, last

    monkeypatch.setattr(MTPDrafter, "first", spy)
    eng = engine(model, 8, spec=mtp_speculator(2))
    outs = eng.generate_batch(PROMPTS[:3], {"temperature": 1.0, "max_new_tokens": 11})
    assert seen
    by_pos = {}
    for prompt, out in zip(PROMPTS[:3], outs):
        ids = torch.tensor([prompt + out.output_ids])
        with torch.no_grad():
            hidden = model(ids, return_hidden=True).hidden
            pos = torch.arange(ids.shape[1] - 1)[None]
            ctx = step_context(model, pos, hidden.dtype)
            _, normed = model.mtp.layers[0](hidden[:, :-1], embed(model, ids[:, 1:]), ctx)
            by_pos[tuple(prompt)] = head_logits(model, normed)[0]
    for prompt, p, lg in seen:
        torch.testing.assert_close(lg, by_pos[prompt][p], atol=1e-4, rtol=0)


def _exact_marginals(model, prompt, steps, temp, top_k):
    """Exact marginal distribution of each generated token 1..steps under the target's sampler."""
    vocab = model.config.vocab_size
    marg, paths, weights = [], [[]], torch.ones(1)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([prompt + p for p in paths])
            logits = model(ids).logits[:, -1]
            n = len(paths)
            probs = target_probs(
                logits, torch.full((n,), temp), torch.ones(n), torch.full((n,), top_k, dtype=torch.long)
            )
            joint = weights[:, None] * probs
            marg.append(joint.sum(0))
            paths = [p + [t] for p in paths for t in range(vocab)]
            weights = joint.reshape(-1)
    return marg


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token the target cannot sample was sampled"
    # Merge cells with small expected counts into one, as the chi-square approximation needs.
    exp = probs[keep] * n
    obs = counts[keep].float()
    small = exp < 5
    if small.any():
        exp = torch.cat([exp[~small], exp[small].sum()[None]])
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


@pytest.mark.parametrize("temp,top_k", [(1.0, -1), (0.7, 5)])
def test_sampling_follows_the_target_and_a_wrong_verifier_does_not(temp, top_k):
    vocab, n, new = 8, 3000, 4
    model = with_mtp(tiny_model(seed=5, vocab=vocab, std=0.3), std=0.5)
    prompt = [1, 2]
    marg = _exact_marginals(model, prompt, new, temp, top_k)
    params = {"temperature": temp, "top_k": top_k, "max_new_tokens": new}
    pvals = {}
    for verifier in ("rejection", "accept_all"):
        spec = mtp_speculator(3, verifier=verifier)
        outs = engine(copy.deepcopy(model), n, seed=12, spec=spec).generate_batch([prompt] * n, params)
        toks = torch.tensor([o.output_ids for o in outs])
        pvals[verifier] = [
            _chi2_pvalue(torch.bincount(toks[:, j], minlength=vocab), marg[j]) for j in range(1, new)
        ]
        if verifier == "rejection":
            assert 0 < spec.totals.accepted < spec.totals.drafted  # both branches exercised
    assert min(pvals["rejection"]) > 0.01, pvals
    assert min(pvals["accept_all"]) < 1e-6, pvals


def test_target_probs_matches_the_engine_sampler():
    from miles_core.engine import sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(4, 16) * 3
    temp = torch.tensor([1.0, 0.5, 0.0, 1.3])
    top_p, top_k = torch.tensor([1.0, 0.8, 1.0, 0.9]), torch.tensor([-1, -1, 3, 4])
    p = target_probs(logits, temp, top_p, top_k)
    assert p[2].argmax() == logits[2].argmax() and p[2].max() == 1
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 16)
    for _ in range(400):
        tok, _ = sample_tokens(logits, temp, top_p, top_k, gen)
        counts[torch.arange(4), tok] += 1
    assert ((counts > 0) <= (p > 0)).all()  # the sampler never leaves p's support
    assert list(itertools.chain(*[(p[i] > 0).nonzero().flatten().tolist() for i in [2]])) == [
        int(logits[2].argmax())
    ]


def test_samples_do_not_depend_on_the_batch():
    """Keyed noise: at temperature 1 a sequence's tokens (drafts, acceptances, residual draws) are the
    same alone and in a batch of other sequences (its key is the engine's first either way)."""
    model = with_mtp(tiny_model(seed=3, std=0.3), std=0.4)
    params = {"temperature": 1.0, "max_new_tokens": 12}
    spec = mtp_speculator(3)
    alone = engine(copy.deepcopy(model), 8, seed=4, spec=spec).generate_batch(PROMPTS[1:2], params)
    assert 0 < spec.totals.accepted < spec.totals.drafted
    crowd = engine(copy.deepcopy(model), 8, seed=4, spec=mtp_speculator(3)).generate_batch(
        PROMPTS[1:2] + PROMPTS[:1] + PROMPTS[2:], params
    )
    assert alone[0].output_ids == crowd[0].output_ids
    torch.testing.assert_close(alone[0].log_probs, crowd[0].log_probs, atol=1e-5, rtol=0)


def test_step_runs_over_a_fixed_row_bucket_on_cpu_when_compiled_or_captured():
    from miles_specrl.speculator import SpecSteps

    spec = mtp_speculator(2)
    eng = engine(with_mtp(tiny_model()), 8, spec=spec)
    eng.generate_batch(PROMPTS[:3], {"temperature": 0, "max_new_tokens": 5})
    assert isinstance(spec._steps, SpecSteps) and not spec._steps.capture
    assert spec._steps.rows(3) == 3  # eager: exactly the slots in use
    spec._steps.compile = True
    assert spec._steps.rows(3) == 4 and spec._steps.rows(8) == 8


# ------------------------------------------------------------------------------------------ CUDA

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _medium(dtype):
    """A small Qwen3-MoE on CUDA with head_dim 32 (the decode attention kernel serves its T=1 steps)."""
    model = tiny_model(seed=7, vocab=256, hidden=128, moe=True, std=0.05, layers=3)
    return with_mtp(model, std=0.05).to(device="cuda", dtype=dtype)


def _run(model, prompts, params, *, graph, compile=False, seed=0, k=3):
    spec = mtp_speculator(k)
    eng = engine(copy.deepcopy(model), 16, seed=seed, spec=spec)
    eng.cuda_graph, eng.compile = graph, compile
    outs = eng.generate_batch(prompts, params)
    return outs, spec


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_captured_speculative_step_matches_the_uncaptured_one_bf16(temp):
    model = _medium(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2, 11)]
    params = {"temperature": temp, "max_new_tokens": 40}
    eager, _ = _run(model, prompts, params, graph=False)
    fast, spec = _run(model, prompts, params, graph=True)
    assert spec._steps.capture and spec._steps._graphs
    for a, b in zip(eager, fast):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-3, rtol=0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_speculation_gives_plain_greedy_tokens_fp32(compile):
    model = _medium(torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 17, 9, 30)]
    params = {"temperature": 0.0, "max_new_tokens": 32}
    plain = engine(copy.deepcopy(model), 16).generate_batch(prompts, params)  # the engine's CUDA graphs
    fast, spec = _run(model, prompts, params, graph=True, compile=compile)
    assert spec.totals.steps > 0
    for a, b in zip(plain, fast):
        assert a.output_ids == b.output_ids
        torch.testing.assert_close(torch.tensor(b.log_probs), torch.tensor(a.log_probs), atol=1e-4, rtol=0)


def test_steps_are_remade_when_the_weights_move_between_generates():
    spec = mtp_speculator(2)
    eng = engine(with_mtp(tiny_model()), 8, spec=spec)
    params = {"temperature": 0, "max_new_tokens": 5}
    eng.generate_batch(PROMPTS[:2], params)
    first = spec._steps
    eng.generate_batch(PROMPTS[:2], params)
    assert spec._steps is first  # same memory: the steps (and on CUDA their graphs) are kept
    with torch.no_grad():
        eng.model.mtp.layers[0].eh_proj.weight = torch.nn.Parameter(
            eng.model.mtp.layers[0].eh_proj.weight * 1
        )
    eng.generate_batch(PROMPTS[:2], params)
    assert spec._steps is not first
