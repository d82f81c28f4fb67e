"""The training forward with fake quantization and the engine forward with packed INT4 agree: log-probs of
the same tokens within 1e-3 in fp32, for both scopes and for the engine's own sampled log-probs."""

from __future__ import annotations

import copy

import pytest
import torch
from int4_helpers import tiny_moe
from miles_int4qat.modules import fake_quantize_for_training, quantize_for_rollout

from miles_core.engine import Engine


@pytest.mark.parametrize("scope", ["experts", "all-linear"])
def test_fake_quant_training_and_int4_engine_log_probs_match(scope):
    policy = tiny_moe(seed=3)
    engine_model = copy.deepcopy(policy)
    plain = copy.deepcopy(policy)
    fake_quantize_for_training(policy, scope, 16)
    quantize_for_rollout(engine_model, scope, 16)
    engine = Engine(engine_model, max_batch_size=4, seed=0)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12]]
    outs = engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": 8})
    worst, worst_plain = 0.0, 0.0
    for prompt, out in zip(prompts, outs):
        tokens = torch.tensor([prompt + out.output_ids])
        targets = tokens[0, len(prompt) :]
        for model, acc in ((policy, "q"), (plain, "p")):
            with torch.no_grad():
                logp = torch.log_softmax(model(tokens).logits[0, len(prompt) - 1 : -1].float(), -1)
            diff = (logp.gather(1, targets[:, None])[:, 0] - torch.tensor(out.log_probs)).abs().max().item()
            if acc == "q":
                worst = max(worst, diff)
            else:
                worst_plain = max(worst_plain, diff)
        with torch.no_grad():  # and the full distributions of a plain forward, engine vs trainer
            torch.testing.assert_close(
                torch.log_softmax(engine_model(tokens).logits, -1),
                torch.log_softmax(policy(tokens).logits, -1),
                rtol=0,
                atol=1e-3,
            )
    assert worst < 1e-3
    assert worst_plain > 10 * worst  # without QAT the trainer would see a visibly different policy
