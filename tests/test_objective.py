"""The trainer's loss by --loss-type and the policy-loss options (miles_core.train.objective): each
flag's effect on one step's gradient against the plain step's, so a dropped or inverted term shows."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_trainer import _flat_grad, _off_policy, _perturbed, make_args, rollout

from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.advantages import CISPO
from miles_core.train.trainer import Trainer
from miles_core.types import UsageError

NO_CLIP = ["--micro-batch-size", "4", "--clip-grad", "0"]


def step(ckpt, samples, extra, estimator=None, ref=None):
    """(gradient, metrics, trainer) of one step on `samples` from the checkpoint's weights."""
    args = make_args(ckpt, [*NO_CLIP, *extra])
    trainer = Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), load_model(ckpt), ref)
    if estimator is not None:  # an estimator the installed entry points may not list yet
        trainer.estimator = trainer.objective.estimator = estimator
    metrics = trainer.train(0, make_train_batch(copy.deepcopy(samples), args))[0]
    return _flat_grad(trainer.model), metrics, trainer


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt, make_args(tiny_ckpt))


@pytest.fixture(scope="module")
def plain(tiny_ckpt, samples):
    return step(tiny_ckpt, samples, [])[0]


def test_use_rollout_logprobs_makes_the_rollout_the_old_policy(tiny_ckpt, samples, plain):
    """Rollout log-probs ln 1.1 below the trainer's: the PPO ratio is exp(logp - rollout) = 1.1 (inside the
    clip), so the gradient is 1.1 x the plain one; without the flag the rollout plays no part."""
    shifted = _off_policy(samples, 1.1)
    g, m, _ = step(tiny_ckpt, shifted, ["--use-rollout-logprobs"])
    torch.testing.assert_close(g, 1.1 * plain, atol=1e-7, rtol=1e-4)
    assert m["ppo_kl"] == pytest.approx(-math.log(1.1), rel=1e-3)
    torch.testing.assert_close(step(tiny_ckpt, shifted, [])[0], plain, atol=1e-7, rtol=1e-4)


def test_use_rollout_logprobs_without_rollout_log_probs_is_refused(tiny_ckpt, samples):
    bare = copy.deepcopy(samples)
    for s in bare:
        s.rollout_log_probs = None
    with pytest.raises(UsageError, match="--use-rollout-logprobs"):
        step(tiny_ckpt, bare, ["--use-rollout-logprobs"])


def test_unbiased_kl_weights_the_kl_loss_by_the_ratio_to_the_old_policy(tiny_ckpt, samples):
    """--use-unbiased-kl with the rollout as the old policy at ratio pi / pi_old = 1.1 on every token: the
    KL loss is 1.1 x the plain estimate (k3, unclamped)."""
    ref = _perturbed(load_model(tiny_ckpt))
    flags = ["--use-kl-loss", "--kl-loss-coef", "0.5", "--kl-loss-type", "k3", "--use-rollout-logprobs"]
    shifted = _off_policy(samples, 1.1)
    _, m, _ = step(tiny_ckpt, shifted, flags, ref=ref)
    _, m_unbiased, _ = step(tiny_ckpt, shifted, [*flags, "--use-unbiased-kl"], ref=ref)
    assert m["kl_loss"] > 0
    assert m_unbiased["kl_loss"] == pytest.approx(1.1 * m["kl_loss"], rel=1e-4)


def test_custom_tis_function_path_from_a_file(tiny_ckpt, samples, plain, tmp_path):
    path = tmp_path / "tis.py"
    path.write_text(
        "import torch\n"
        "def compute_tis_weights(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, **kw):\n"
        "    return pg_loss * 0.25, loss_masks, {'my_weight': torch.full_like(pg_loss, 0.25)}\n"
    )
    g, m, _ = step(tiny_ckpt, samples, ["--use-tis", "--custom-tis-function-path", str(path)])
    torch.testing.assert_close(g, 0.25 * plain, atol=1e-7, rtol=1e-4)
    assert m["my_weight"] == pytest.approx(0.25, rel=1e-5)


def test_mis_mask_mode_rejects_every_token_far_off_policy(tiny_ckpt, samples):
    """Every ratio at 8 is outside MIS's [0.5, 2] window: no token is left, no gradient."""
    g, m, _ = step(tiny_ckpt, _off_policy(samples, 8.0), ["--use-tis", "--tis-mode", "mask"])
    assert float(g.abs().max()) == 0.0
    assert m["mis_tis_mask_fraction_high"] == pytest.approx(1.0)


def test_custom_pg_loss_reducer(tiny_ckpt, samples, plain, tmp_path):
    """A reducer returning 3 x the default sum of sample means triples the gradient (the trainer divides
    by the step's sample count, as slime's Megatron scaling does)."""
    path = tmp_path / "reducer.py"
    path.write_text(
        "def get_pg_loss_reducer(total_lengths, response_lengths, loss_masks, per_token=False):\n"
        "    def reduce(x):\n"
        "        parts = zip(x.split(response_lengths), loss_masks)\n"
        "        return 3 * sum((v * m).sum() / m.sum().clamp(min=1) for v, m in parts)\n"
        "    return reduce\n"
    )
    g, _, _ = step(tiny_ckpt, samples, ["--custom-pg-loss-reducer-function-path", str(path)])
    torch.testing.assert_close(g, 3 * plain, atol=1e-7, rtol=1e-4)


def test_cispo_matches_grpo_on_policy_and_keeps_clipped_gradients(tiny_ckpt, samples, plain):
    """On policy (ratio 1) CISPO's gradient -A * grad(logp) is GRPO's. With the rollout as the old policy
    at ratio 1/3, the clip (1 - 0.2 = 0.8) under stop-gradient makes it 0.8 x that, every token clipped
    but none without gradient (PPO zeroes the A < 0 tokens' gradient there)."""
    g, _, _ = step(tiny_ckpt, samples, [], estimator=CISPO())
    torch.testing.assert_close(g, plain, atol=1e-7, rtol=1e-4)
    shifted = _off_policy(samples, 1 / 3)
    g_low, m, _ = step(tiny_ckpt, shifted, ["--use-rollout-logprobs"], estimator=CISPO())
    torch.testing.assert_close(g_low, 0.8 * plain, atol=1e-7, rtol=1e-4)
    assert m["pg_clipfrac"] == pytest.approx(1.0)
    g_ppo, _, _ = step(tiny_ckpt, shifted, ["--use-rollout-logprobs"])
    assert not torch.allclose(g_ppo, 0.8 * plain, atol=1e-6, rtol=1e-3)


def test_sft_loss_is_the_response_nll(tiny_ckpt, samples):
    """--loss-type sft_loss: the step's loss is the mean over samples of each response's mean NLL, and its
    gradient equals that of a --custom-loss-function-path loss written from the logits by hand."""
    sft = copy.deepcopy(samples)
    for s in sft:
        s.sampling_params, s.rollout_log_probs = {}, None  # temperature 1, as for data rows
    one = ["--rollout-batch-size", "8", "--n-samples-per-prompt", "1"]
    args = make_args(tiny_ckpt, [*NO_CLIP, *one, "--loss-type", "sft_loss"])
    model = load_model(tiny_ckpt)
    hand = 0.0
    for s in sft:
        toks = torch.tensor(s.tokens)
        r = s.response_length
        with torch.no_grad():
            logits = model(toks[:-1][None]).logits[0, -r:].float()
        logp = torch.log_softmax(logits, -1).gather(-1, toks[-r:, None])
        hand += float(-logp.mean())
    trainer = Trainer(args, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}), model)
    m = trainer.train(0, make_train_batch(copy.deepcopy(sft), args))[0]
    assert m["loss"] == pytest.approx(hand / len(sft), rel=1e-5)
    g_sft = _flat_grad(trainer.model)
    path = _write_custom_nll(tiny_ckpt.parent / "nll_loss.py")
    flags = [*one, "--loss-type", "custom_loss", "--custom-loss-function-path", path]
    g_custom, m_custom, _ = step(tiny_ckpt, sft, flags)
    torch.testing.assert_close(g_custom, g_sft, atol=1e-7, rtol=1e-4)
    assert m_custom["nll"] == pytest.approx(m["loss"], rel=1e-5)


def _write_custom_nll(path) -> str:
    path.write_text(
        "import torch\n"
        "def loss_function(args, batch, logits, sum_of_sample_mean):\n"
        "    logp = torch.log_softmax(logits.float(), -1).gather(-1, batch['targets'][:, None])[:, 0]\n"
        "    assert len(batch['loss_masks']) == len(batch['response_lengths'])\n"
        "    loss = -sum_of_sample_mean(logp)\n"
        "    return loss, {'nll': loss.detach()}\n"
    )
    return str(path)
