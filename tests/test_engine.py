"""The rollout engine: cached decoding equals plain greedy decoding, log-probs equal the trainer's,
continuous batching, stop handling, prefix sharing and route capture."""

from __future__ import annotations

import asyncio

import pytest
import torch

from miles_core.data import Tokenizer
from miles_core.engine import Engine, SamplingParams, sample_tokens
from miles_core.model import load_model


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt).eval()


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer.from_pretrained(tiny_ckpt)


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_matches_uncached_decoding(model, tok):
    engine = Engine(model, None, max_batch_size=8)  # no tokenizer: EOS only from the config
    engine._eos = set()  # decode the full length so every step is compared
    prompts = [tok.encode("What is 12+34?"), tok.encode("hi"), tok.encode("What is 99-1? Answer")]
    outs = engine.generate_batch(prompts, {"temperature": 0.0, "max_new_tokens": 12})
    for p, o in zip(prompts, outs):
        assert o.output_ids == naive_greedy(model, p, 12)
        assert o.finish_reason == "length"


def test_log_probs_equal_full_forward(model, tok):
    engine = Engine(model, tok, max_batch_size=16, seed=3)
    prompt = tok.encode("What is 45+17?")
    outs = engine.generate_batch([prompt] * 4, {"temperature": 0.7, "max_new_tokens": 10})
    for o in outs:
        seq = torch.tensor([prompt + o.output_ids])
        with torch.no_grad():
            logits = model(seq).logits[0, len(prompt) - 1 : -1].float() / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.output_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(o.log_probs), ref, atol=1e-5)


def test_continuous_batching_frees_slots(model, tok):
    engine = Engine(model, tok, max_batch_size=2)
    engine._eos = set()

    async def go():
        lens = [3, 9, 5, 7, 2]
        outs = await asyncio.gather(
            *(
                engine.generate(tok.encode(f"q{i}"), {"temperature": 0.0, "max_new_tokens": n})
                for i, n in enumerate(lens)
            )
        )
        return lens, outs

    lens, outs = asyncio.run(go())
    assert [len(o.output_ids) for o in outs] == lens  # 5 requests through 2 slots
    for i, o in enumerate(outs):
        assert o.output_ids == naive_greedy(model, tok.encode(f"q{i}"), lens[i])


def test_group_prefill_is_shared(model, tok):
    engine = Engine(model, tok, max_batch_size=8)
    prompt = tok.encode("What is 10+10?")
    engine.generate_batch([prompt] * 4, {"temperature": 1.0, "max_new_tokens": 4})
    assert engine.stats["prefill_tokens"] == len(prompt)  # one prefill for the whole group


def test_a_burst_arriving_over_loop_turns_is_prefilled_once(model, tok):
    """Requests reaching the queue one loop turn apart (as a burst of HTTP clients does) are admitted
    together, in one prefill; with no admission window each turn's arrivals get a prefill of their own."""
    prompts = [tok.encode(f"What is {i}+{i}?") for i in range(6)]

    async def trickle(engine):
        tasks = []
        for p in prompts:
            tasks.append(asyncio.ensure_future(engine.generate(p, {"temperature": 0.0, "max_new_tokens": 3})))
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    prefills = {}
    for window in (60.0, 0.0):
        engine = Engine(model, tok, max_batch_size=8)
        engine._eos = set()
        engine.admit_quiet_s, engine.admit_window_s = 0.2, window
        outs = asyncio.run(trickle(engine))
        assert [len(o.output_ids) for o in outs] == [3] * 6
        prefills[window] = engine.stats["prefills"]
    assert prefills[60.0] == 1
    assert prefills[0.0] > 1


def test_stop_token_and_eos(model, tok):
    engine = Engine(model, tok, max_batch_size=4)
    prompt = tok.encode("What is 1+1?")
    first = naive_greedy(model, prompt, 1)[0]
    out = engine.generate_batch(
        [prompt], {"temperature": 0.0, "max_new_tokens": 8, "stop_token_ids": [first]}
    )[0]
    assert out.output_ids == [first] and out.finish_reason == "stop"


def test_routes_shape_and_values(model, tok):
    engine = Engine(model, tok, max_batch_size=4)
    engine.capture_routes = True
    engine._eos = set()
    prompt = tok.encode("What is 3+4?")
    out = engine.generate_batch([prompt], {"temperature": 0.0, "max_new_tokens": 5})[0]
    cfg = model.config
    assert out.routed_experts.shape == (len(prompt) + 5 - 1, model.num_moe_layers, cfg.num_experts_per_tok)
    assert out.routed_experts.dtype.name == "int32"
    from miles_core.model import RoutingState

    routing = RoutingState(record=True)
    with torch.no_grad():
        model(torch.tensor([prompt + out.output_ids[:-1]]), routing=routing)
    full = torch.stack([t[0] for t in routing.used_topk], dim=1)
    assert torch.equal(full.sort(-1).values, torch.as_tensor(out.routed_experts).long().sort(-1).values)


def test_sampler_top_k_one_is_greedy_and_top_p_truncates():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]] * 64)
    gen = torch.Generator().manual_seed(0)
    t, lp = sample_tokens(
        logits, torch.full((64,), 1.0), torch.ones(64), torch.ones(64, dtype=torch.long), gen
    )
    assert (t == 1).all()
    assert torch.allclose(lp, torch.log_softmax(logits, -1)[:, 1])
    t, _ = sample_tokens(logits, torch.full((64,), 1.0), torch.full((64,), 0.5), torch.full((64,), -1), gen)
    assert (t == 1).all()  # token 1 alone holds > 50% of the mass
    t, _ = sample_tokens(logits, torch.full((64,), 1.0), torch.ones(64), torch.full((64,), 2), gen)
    assert set(t.tolist()) <= {1, 2}


def test_sampling_params_from_dict():
    p = SamplingParams.from_dict({"temperature": 0.5, "stop": "</s>", "stop_token_ids": None, "extra": 1})
    assert p.temperature == 0.5 and p.stop == ("</s>",) and p.stop_token_ids == ()
