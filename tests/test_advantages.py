"""Tests for miles_core.train.advantages: group normalisation, GRPO / REINFORCE++ / REINFORCE++-baseline
against hand-computed values, and the core ``advantage`` hookimpl dispatched through pluggy."""

from __future__ import annotations

import argparse
import math
import statistics

import pluggy
import pytest
import torch
from approx import close, t

from miles_core import hookspecs
from miles_core.train import advantages as adv_mod
from miles_core.train.advantages import (
    group_normalize,
    grpo_advantages,
    masked_whiten,
    reinforce_plus_plus_baseline_advantages,
    reinforce_plus_plus_returns,
)
from miles_core.types import Sample, TrainBatch, UsageError


def whitened(values: list[float]) -> list[float]:
    mean, std = statistics.fmean(values), statistics.stdev(values)  # stdev: unbiased, like the code
    return [(v - mean) / std for v in values]


# ---- group normalisation ---------------------------------------------------------------------------------


def test_group_normalize_with_and_without_std():
    rewards = t(1, 0, 0, 0, 1, 1, 0, 0)
    # group 1: mean .25, unbiased std sqrt(0.75 / 3) = 0.5; group 2: mean .5, std sqrt(1/3)
    s2 = math.sqrt(1 / 3)
    expected = [0.75 / 0.5, -0.25 / 0.5, -0.25 / 0.5, -0.25 / 0.5] + [
        0.5 / s2,
        0.5 / s2,
        -0.5 / s2,
        -0.5 / s2,
    ]
    close(group_normalize(rewards, 4), expected, tol=1e-4)
    close(group_normalize(rewards, 4, std_normalize=False), [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])


def test_group_of_identical_rewards_is_zero_not_nan():
    out = group_normalize(t(0.7, 0.7, 0.7, 1.0, 0.0, 0.5), 3)
    assert torch.isfinite(out).all()
    close(out[:3], [0.0, 0.0, 0.0])
    close(out[3:], [1.0, -1.0, 0.0], tol=1e-4)  # mean .5, std .5


def test_group_normalize_rejects_partial_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_normalize(t(1, 2, 3), 4)


def test_grpo_advantages_broadcast_over_response():
    out = grpo_advantages(t(1, 0), [t(1, 1, 0), t(1, 1)], group_size=2, std_normalize=False)
    close(out[0], [0.5, 0.5, 0.5])
    close(out[1], [-0.5, -0.5])


# ---- REINFORCE++ -----------------------------------------------------------------------------------------


def test_reinforce_pp_discounting_and_kl_shaping():
    kl, mask = [t(0.1, 0.2, 0.3, 0.4)], [t(1, 1, 1, 0)]
    out = reinforce_plus_plus_returns(t(1.0), kl, mask, kl_coef=0.5, gamma=0.9, whiten=False)
    # token rewards: -0.05, -0.1, -0.15 + 1 (last masked token), 0 (masked-out token carries nothing)
    g3 = 0.0
    g2 = 0.85 + 0.9 * g3
    g1 = -0.1 + 0.9 * g2
    g0 = -0.05 + 0.9 * g1
    close(out[0], [g0, g1, g2, g3])


def test_reinforce_pp_whitens_over_masked_tokens():
    kl = [t(0.0, 0.0), t(0.0, 0.0, 0.0)]
    mask = [t(1, 1), t(1, 1, 0)]
    out = reinforce_plus_plus_returns(t(1.0, 2.0), kl, mask, kl_coef=0.0, gamma=1.0)
    # gamma 1, no KL: returns [1, 1] and [2, 2, 0]; statistics over the 4 masked tokens only
    raw_masked = [1.0, 1.0, 2.0, 2.0]
    mean, std = statistics.fmean(raw_masked), statistics.stdev(raw_masked)
    close(torch.cat(out), [(v - mean) / std for v in [1.0, 1.0, 2.0, 2.0, 0.0]], tol=1e-4)


def test_reinforce_pp_baseline():
    kl, mask = [t(0.2, 0.4), t(0.0, 0.6)], [t(1, 1), t(1, 1)]
    raw = reinforce_plus_plus_baseline_advantages(t(1.0, 0.0), 2, kl, mask, kl_coef=0.5, whiten=False)
    close(raw[0], [0.5 - 0.1, 0.5 - 0.2])  # reward - group mean - kl_coef * kl
    close(raw[1], [-0.5, -0.5 - 0.3])
    out = reinforce_plus_plus_baseline_advantages(t(1.0, 0.0), 2, kl, mask, kl_coef=0.5)
    close(torch.cat(out), whitened([0.4, 0.3, -0.5, -0.8]), tol=1e-4)


def test_masked_whiten_constant_values_stay_finite():
    out = masked_whiten([t(2.0, 2.0), t(2.0)], [t(1, 1), t(1)])
    close(torch.cat(out), [0.0, 0.0, 0.0])


# ---- the hookimpl ----------------------------------------------------------------------------------------


def make_batch(
    rewards: list[float], lengths: list[int], masks: list[list[float]] | None = None
) -> TrainBatch:
    samples = [Sample(index=i, group_index=i // 2, response_length=n) for i, n in enumerate(lengths)]
    masks = masks or [[1.0] * n for n in lengths]
    return TrainBatch(
        samples=samples,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        tokens=[torch.arange(n + 2) for n in lengths],
        loss_masks=[torch.tensor(m, dtype=torch.float32) for m in masks],
    )


def make_args(**overrides) -> argparse.Namespace:
    base = dict(
        advantage_estimator="grpo",
        n_samples_per_prompt=2,
        disable_grpo_std_normalization=False,
        disable_rewards_normalization=False,
        normalize_advantages=False,
        gamma=1.0,
        kl_coef=0.0,
        kl_loss_type="k1",
    )
    base.update(overrides)
    return argparse.Namespace(**base)


@pytest.fixture()
def pm() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("miles")
    manager.add_hookspecs(hookspecs)
    manager.register(adv_mod)
    return manager


def test_hook_grpo_and_gspo(pm):
    batch = make_batch([1.0, 0.0, 3.0, 3.0], [2, 3, 1, 2])
    a = 0.5 / math.sqrt(0.5)  # unbiased std of {1, 0} is sqrt(0.5): (1 - 0.5) / std = 0.7071
    for est in ("grpo", "gspo"):
        out = pm.hook.advantage(args=make_args(advantage_estimator=est), batch=batch)
        assert [x.numel() for x in out] == [2, 3, 1, 2]
        close(torch.cat(out), [a] * 2 + [-a] * 3 + [0.0] * 3, tol=1e-4)
    dr = pm.hook.advantage(args=make_args(disable_grpo_std_normalization=True), batch=batch)
    close(torch.cat(dr), [0.5] * 2 + [-0.5] * 3 + [0.0] * 3)


def test_hook_normalize_advantages_whitens(pm):
    batch = make_batch([1.0, 0.0], [2, 2], masks=[[1, 1], [1, 0]])
    out = pm.hook.advantage(
        args=make_args(disable_grpo_std_normalization=True, normalize_advantages=True), batch=batch
    )
    # raw [.5, .5, -.5, -.5]; the masked-out last token is transformed but not counted
    mean, std = statistics.fmean([0.5, 0.5, -0.5]), statistics.stdev([0.5, 0.5, -0.5])
    close(torch.cat(out), [(v - mean) / std for v in [0.5, 0.5, -0.5, -0.5]], tol=1e-4)


def test_hook_reinforce_pp_uses_old_and_ref_log_probs(pm):
    batch = make_batch([1.0, 0.0], [2, 1])
    batch.old_log_probs = [t(-1.0, -1.0), t(-2.0)]
    batch.ref_log_probs = [t(-1.2, -1.0), t(-1.5)]  # k1 kl: [0.2, 0.0], [-0.5]
    args = make_args(advantage_estimator="reinforce_plus_plus", kl_coef=0.1, gamma=0.5)
    out = pm.hook.advantage(args=args, batch=batch)
    # sample 0: token rewards [-0.02, 1.0] -> returns [-0.02 + 0.5, 1.0]; sample 1: [0.05]
    close(torch.cat(out), whitened([0.48, 1.0, 0.05]), tol=1e-4)
    batch.ref_log_probs = None  # no ref forward: KL shaping is zero
    out = pm.hook.advantage(args=args, batch=batch)
    close(torch.cat(out), whitened([0.5, 1.0, 0.0]), tol=1e-4)


def test_hook_reinforce_pp_baseline(pm):
    batch = make_batch([1.0, 0.0, 2.0, 2.0], [1, 1, 1, 1])
    out = pm.hook.advantage(args=make_args(advantage_estimator="reinforce_plus_plus_baseline"), batch=batch)
    close(torch.cat(out), whitened([0.5, -0.5, 0.0, 0.0]), tol=1e-4)


def test_hook_usage_errors(pm):
    with pytest.raises(UsageError, match=r"unknown --advantage-estimator 'vapo'; installed: .*grpo"):
        pm.hook.advantage(args=make_args(advantage_estimator="vapo"), batch=make_batch([1.0, 0.0], [1, 1]))
    batch = make_batch([1.0, 0.0, 1.0], [1, 1, 1])
    for s in batch.samples:
        s.group_index = None  # no group ids: groups are --n-samples-per-prompt long, and 3 is not
    with pytest.raises(UsageError, match="n-samples-per-prompt"):
        pm.hook.advantage(args=make_args(), batch=batch)


def test_groups_follow_group_index_when_a_generate_function_returns_several_samples(pm):
    # Prompt 0 produced three samples (e.g. one per turn), prompt 1 two: each normalised in its own group.
    batch = make_batch([1.0, 0.0, 2.0, 5.0, 3.0], [1, 1, 1, 1, 1])
    for s, g in zip(batch.samples, [0, 0, 0, 1, 1]):
        s.group_index = g
    out = torch.cat(pm.hook.advantage(args=make_args(disable_grpo_std_normalization=True), batch=batch))
    close(out, [0.0, -1.0, 1.0, 1.0, -1.0])
    out = torch.cat(pm.hook.advantage(args=make_args(), batch=batch))
    close(out, [0.0, -1.0, 1.0, 1 / math.sqrt(2), -1 / math.sqrt(2)], tol=1e-4)  # std of {5, 3}: sqrt 2


def test_disable_rewards_normalization_trains_on_raw_rewards(pm):
    batch = make_batch([1.0, 0.0, 3.0, 3.0], [2, 1, 1, 1])
    out = pm.hook.advantage(args=make_args(disable_rewards_normalization=True), batch=batch)
    close(torch.cat(out), [1.0, 1.0, 0.0, 3.0, 3.0])


def test_gspo_supplies_its_sequence_ratio_and_grpo_the_token_ratio():
    from miles_core import drivers

    new, old = t(-1.0, -2.0, -0.5), t(-1.5, -1.0, -0.5)
    mask, lengths = t(1, 1, 1), torch.tensor([2, 1])
    assert drivers.get_estimator("grpo").policy_log_ratio(new, old, mask, lengths) is None
    ratio = drivers.get_estimator("gspo").policy_log_ratio(new, old, mask, lengths)
    close(ratio, [-0.25, -0.25, 0.0])  # per-sample mean of new - old, broadcast


def test_hook_reinforce_pp_needs_no_whole_groups(pm):
    out = pm.hook.advantage(
        args=make_args(advantage_estimator="reinforce_plus_plus"),
        batch=make_batch([1.0, 0.0, 2.0], [1, 1, 1]),
    )
    close(torch.cat(out), whitened([1.0, 0.0, 2.0]), tol=1e-4)
