"""Speculative rollout in --true-on-policy-mode: the log-probs of tokens accepted several at a time by a
verify forward equal bitwise those the trainer recomputes over packed or padded micro-batches."""

from __future__ import annotations

import copy

import pytest
import torch
from specrl_helpers import engine, make_args, model_speculator, plugin_manager, tiny_model, with_mtp

from miles_core import Sample, Status
from miles_core.loop import make_train_batch
from miles_core.model import make_batch_invariant
from miles_core.train.trainer import Trainer


@pytest.mark.parametrize("layout", [["--micro-batch-size", "2"], ["--use-dynamic-batch-size",
                                                                  "--max-tokens-per-gpu", "40"]])  # fmt: skip
def test_speculative_rollout_log_probs_equal_the_trainers(layout):
    pm = plugin_manager()
    args = make_args(pm, "--mtp-num-layers", "1", "--true-on-policy-mode", *layout)
    policy = with_mtp(tiny_model(moe=True))
    rollout_model = copy.deepcopy(policy)
    make_batch_invariant(rollout_model)  # what the core's configure_model does in the mode
    # A draft equal to the target: most drafts are accepted, so most tokens come from multi-token verifies.
    eng = engine(rollout_model, 4, spec=model_speculator(copy.deepcopy(policy), k=3))
    prompts = [[3, 5, 7], [11, 2], [3, 5, 7], [9, 9, 9, 1, 4]]
    outs = eng.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": 12})
    assert sum(o.spec_info["spec_accept_length"] for o in outs) / len(outs) > 1.5
    samples = [
        Sample(group_index=i // 2, index=i, tokens=p + o.output_ids, response_length=len(o.output_ids),
               rollout_log_probs=o.log_probs, loss_mask=[1] * len(o.output_ids), reward=float(i % 2),
               status=Status.COMPLETED, sampling_params=o.sampling_params)
        for i, (p, o) in enumerate(zip(prompts, outs))
    ]  # fmt: skip
    make_batch_invariant(policy)
    batch = make_train_batch(samples, args)
    old = Trainer(args, pm, policy).compute_log_probs(batch, "old")
    for o, r in zip(old, batch.rollout_log_probs):
        assert torch.equal(o, r)
