"""Route tables: bad shapes fail in pre_forward with one sentence naming the sample and both shapes,
SGLang's base64 payload decodes (directly and through on_route_record), samples that do not train get a
placeholder, and the mismatch count compares top-k sets regardless of slot order."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from miles_r3.routes import RouteShape, count_mismatch, decode_sglang_routes
from r3_helpers import batch_of, make_args, plugin_manager, tiny_moe

from miles_core import Sample, Status, UsageError
from miles_core.rollout.manager import rollout_options

L, K, E = 2, 2, 8  # tiny_moe(): 2 MoE layers, top-2 of 8 experts


def _encode(arr: np.ndarray) -> str:
    return base64.b64encode(arr.astype("<i4").tobytes()).decode("ascii")


def _sample(index: int, tokens: int, routes=None, response: int = 3) -> Sample:
    s = Sample(
        index=index, group_index=index // 2, tokens=list(range(1, tokens + 1)), response_length=response
    )
    s.loss_mask, s.rollout_log_probs = [1] * response, [-1.0] * response
    s.status, s.reward = Status.COMPLETED, float(index % 2)
    s.rollout_routed_experts = routes
    return s


def _routes(tokens: int, layers: int = L, k: int = K, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [[rng.permutation(E)[:k] for _ in range(layers)] for _ in range(tokens - 1)]
    return np.asarray(rows, dtype=np.int32).reshape(tokens - 1, layers, k)


def _pre_forward(samples: list[Sample], flag: str = "--use-rollout-routing-replay"):
    pm = plugin_manager()
    args = make_args(pm, flag, num_samples=len(samples))
    batch = batch_of(samples, args)
    pm.hook.pre_forward(args=args, model=tiny_moe(), batch=batch, stage="old")
    return batch


@pytest.mark.parametrize(
    ("bad", "shape"),
    [(_routes(7, layers=3), (6, 3, 2)), (_routes(7, k=3), (6, 2, 3)), (_routes(6), (5, 2, 2))],
    ids=["layers", "topk", "length"],
)
def test_shape_mismatch_is_one_sentence_naming_sample_and_shapes(bad, shape):
    samples = [_sample(0, 7, _routes(7)), _sample(1, 7, bad)]
    with pytest.raises(UsageError) as err:
        _pre_forward(samples)
    msg = str(err.value)
    assert msg.startswith("sample 1 has routed experts of shape ")
    assert str(shape) in msg and "(6, 2, 2)" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")


def test_expert_ids_out_of_range_are_refused():
    bad = _routes(7)
    bad[2, 1, 0] = E
    with pytest.raises(
        UsageError, match=r"^sample 0 has routed expert ids in \[\d+, 8\] but the model has 8 "
    ):
        _pre_forward([_sample(0, 7, bad), _sample(1, 7, _routes(7))])


def test_trained_sample_without_routes_fails_but_untrained_gets_placeholder():
    with pytest.raises(UsageError, match=r"^sample 1 has no rollout routes"):
        _pre_forward([_sample(0, 7, _routes(7)), _sample(1, 7, None)])
    failed = _sample(1, 7, None)
    failed.status = Status.FAILED  # loss mask all zero: its experts never reach the loss
    batch = _pre_forward([_sample(0, 7, _routes(7)), failed])
    assert torch.equal(batch.replay_routes[0], torch.from_numpy(_routes(7)))
    placeholder = batch.replay_routes[1]
    assert placeholder.shape == (6, L, K) and (placeholder == torch.tensor([0, 1])).all()
    assert batch.record_routes is True


def test_measure_only_mode_records_without_replaying():
    batch = _pre_forward([_sample(0, 7, _routes(7)), _sample(1, 7, None)], flag="--record-routing-mismatch")
    assert batch.replay_routes is None and batch.record_routes is True


def test_decode_sglang_routes_round_trip_and_errors():
    routes = _routes(9, layers=3, k=4)
    meta = {"routed_experts": _encode(routes)}
    decoded = decode_sglang_routes(meta, num_tokens=9, num_layers=3, topk=4)
    assert decoded.dtype == np.int32 and np.array_equal(decoded, routes)
    with pytest.raises(UsageError, match="holds 96 expert ids but 10 tokens"):
        decode_sglang_routes(meta, num_tokens=10, num_layers=3, topk=4)
    with pytest.raises(UsageError, match="no meta_info\\['routed_experts'\\]"):
        decode_sglang_routes({}, num_tokens=9, num_layers=3, topk=4)
    with pytest.raises(UsageError, match="not valid base64"):
        decode_sglang_routes({"routed_experts": "%%%"}, num_tokens=9, num_layers=3, topk=4)


def test_base64_payload_through_on_route_record_is_reshaped_at_the_forward():
    pm = plugin_manager()
    args = make_args(pm, "--use-rollout-routing-replay", num_samples=2)
    samples = [_sample(0, 7), _sample(1, 7)]
    for i, s in enumerate(samples):
        pm.hook.on_route_record(args=args, sample=s, routed_experts=_encode(_routes(7, seed=i)))
        assert s.rollout_routed_experts.shape == (6, L * K)
    batch = batch_of(samples, args)
    pm.hook.pre_forward(args=args, model=tiny_moe(), batch=batch, stage="old")
    assert torch.equal(batch.replay_routes[1], torch.from_numpy(_routes(7, seed=1)))


def test_count_mismatch_compares_sets_and_route_memory_is_reported():
    a = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]])
    same_sets = a[:, :, ::-1]
    assert count_mismatch(a, same_sets).differing_entries == 0
    b = a.copy()
    b[1, 0, 1] = 2  # one slot of one (token, layer) differs
    c = count_mismatch(a, b)
    assert (c.entries, c.differing_entries, c.tokens, c.differing_tokens) == (8, 1, 2, 1)
    assert c.entry_frac == 1 / 8 and c.token_frac == 1 / 2
    pm = plugin_manager()
    args = make_args(pm, "--use-rollout-routing-replay", num_samples=2)
    samples = [_sample(0, 7, _routes(7)), _sample(1, 5, _routes(5))]
    (metrics,) = [m for m in pm.hook.rollout_metrics(args=args, rollout_id=0, samples=samples) if m]
    shape = RouteShape(L, K, E)
    assert metrics["routes_bytes"] == (6 + 4) * shape.bytes_per_token == (6 + 4) * L * K * 4
    assert metrics["routes_bytes_per_token"] == shape.bytes_per_token


def test_dense_model_is_refused_before_generation():
    from miles_core.engine import Engine
    from miles_core.model import ModelConfig, build_model

    dense = build_model(
        ModelConfig.from_hf(
            {"architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8,
             "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        )
    )  # fmt: skip
    pm = plugin_manager()
    args = make_args(pm, "--use-rollout-routing-replay", num_samples=2)
    with pytest.raises(UsageError, match="needs a mixture-of-experts model but LlamaForCausalLM"):
        rollout_options(pm, args, 0, Engine(dense))
