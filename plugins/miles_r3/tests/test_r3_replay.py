"""Acceptance: a bf16 rollout and an fp32 trainer disagree on experts (routing_mismatch_frac > 0); with
--use-rollout-routing-replay every training-side forward uses exactly the rollout's experts, the router
still gets gradient, and the train/rollout KL drops. --use-routing-replay replays the old forward's routes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from miles_r3.routes import MismatchCount, count_mismatch
from r3_helpers import batch_of, make_args, plugin_manager, rollout, tiny_moe

from miles_core import hookimpl
from miles_core.train.trainer import Trainer


@pytest.fixture(scope="module")
def rolled():
    """One bf16 rollout (routes captured) of one fp32 model; each test trains its own copy."""
    model = tiny_moe()
    pm = plugin_manager()
    samples = rollout(model, pm, make_args(pm, "--record-routing-mismatch"), new_tokens=16)
    assert all(s.rollout_routed_experts.shape == (len(s.tokens) - 1, 2, 2) for s in samples)
    return model, samples


class _BatchSpy:
    """A plugin that remembers the batch of the latest pre_forward (a step's slice, for "train")."""

    batch = None

    @hookimpl(trylast=True)
    def pre_forward(self, batch):
        self.batch = batch


def _spy_forwards(trainer: Trainer, spy: _BatchSpy) -> list:
    """Wrap trainer.forward to keep (sample, experts used [len-1, L, k]) for every sample it runs."""
    calls, inner = [], trainer.forward

    def forward(model, mb, record=False, with_entropy=True):
        out = inner(model, mb, record=record, with_entropy=with_entropy)
        routing = out[3]
        for j, i in enumerate(mb.index):
            n = len(spy.batch.tokens[i]) - 1
            used = None if routing is None else torch.stack([t[j, :n] for t in routing.used_topk], dim=1)
            calls.append((spy.batch.samples[i], mb.replay is not None, used))
        return out

    trainer.forward = forward
    return calls


def _train(rolled, *flags: str, steps: int = 1):
    model, samples = rolled
    pm = plugin_manager()
    args = make_args(pm, *flags)
    args.global_batch_size, args.num_steps_per_rollout = len(samples) // steps, steps
    batch = batch_of(copy.deepcopy(samples), args)
    trainer = Trainer(args, pm, copy.deepcopy(model))
    spy = _BatchSpy()
    pm.register(spy)
    calls = _spy_forwards(trainer, spy)
    metrics = trainer.train(0, batch)
    return trainer, batch, calls, metrics


def test_without_replay_the_trainer_routes_differently(rolled):
    _, batch, calls, metrics = _train(rolled, "--record-routing-mismatch")
    assert batch.replay_routes is None and not any(replayed for _, replayed, _ in calls)
    assert metrics[0]["routing_mismatch_frac"] > 0
    assert 0 < metrics[0]["routing_mismatch_token_frac"] <= 1


def test_rollout_replay_uses_rollout_experts_everywhere_and_router_learns(rolled):
    trainer, batch, calls, metrics = _train(rolled, "--use-rollout-routing-replay")
    _, _, _, plain = _train(rolled, "--record-routing-mismatch")
    assert len(calls) == 2 * len(batch)  # the "old" forward and the optimizer step, every sample
    total = MismatchCount()
    for sample, replayed, used in calls:
        assert replayed
        total = total + count_mismatch(sample.rollout_routed_experts, used)
    assert total.entries > 0 and total.differing_entries == 0  # 100% of entries replayed
    assert metrics[0]["routing_mismatch_frac"] > 0  # the router's own choice still differs: replay mattered
    assert metrics[0]["train_rollout_kl"] < plain[0]["train_rollout_kl"]
    for layer in trainer.model.model.layers:
        grad = layer.mlp.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_routing_replay_replays_the_old_forward(rolled):
    _, batch, calls, metrics = _train(rolled, "--use-routing-replay", steps=2)
    assert batch.recorded_routes is not None and "routing_mismatch_frac" in metrics[-1]
    old, steps = calls[: len(batch)], calls[len(batch) :]
    assert not any(replayed for _, replayed, _ in old) and len(steps) == len(batch)
    recorded = {id(s): r for s, r in zip(batch.samples, batch.recorded_routes)}
    for sample, replayed, used in steps:  # two optimizer steps of 4 samples, micro-batches of 3 and 1
        assert replayed and torch.equal(used.int(), recorded[id(sample)])
