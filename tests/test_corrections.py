"""Tests for miles_core.train.corrections: TIS weights and clip fraction, IcePop masking, and the
``loss_correction`` hookimpl through pluggy, against hand-computed values."""

from __future__ import annotations

import argparse
import math

import pluggy
import pytest
import torch
from approx import close, t

from miles_core import hookspecs
from miles_core.train import corrections
from miles_core.train.losses import LossTerms


def make_terms(ratios: list[float], mask: list[float], with_rollout: bool = True) -> LossTerms:
    """Terms whose train/rollout ratio exp(old - rollout) is `ratios`, with pg_loss = 1 per token."""
    n = len(ratios)
    old = torch.full((n,), -1.0)
    pg = torch.ones(n, requires_grad=True)
    return LossTerms(
        log_probs=old.clone(),
        old_log_probs=old,
        advantages=torch.ones(n),
        loss_mask=t(*mask),
        pg_loss=pg * 1.0,
        lengths=[n],
        rollout_log_probs=old - t(*[math.log(r) for r in ratios]) if with_rollout else None,
    )


def args(**kw) -> argparse.Namespace:
    base = dict(
        use_tis=False, tis_clip=2.0, tis_clip_low=0.0, use_icepop=False, icepop_low=0.5, icepop_high=5.0,
        use_opsm=False, opsm_delta=1e-4, use_rs=False, tis_mode=None, custom_tis_function_path=None,
        calculate_per_token_loss=False,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


def test_tis_weights_and_clipfrac():
    terms = make_terms([1.0, 3.0, 0.25, 1.5], mask=[1, 1, 1, 0])
    metrics = corrections.loss_correction(args=args(use_tis=True, tis_clip_low=0.5), terms=terms)
    close(terms.pg_loss, [1.0, 2.0, 0.5, 1.5])  # clamp to [0.5, 2]
    assert metrics["tis_clipfrac"] == pytest.approx(2 / 3)  # 3.0 and 0.25 clipped; 4th token masked
    assert metrics["tis_weight_mean"] == pytest.approx((1.0 + 2.0 + 0.5) / 3)


def test_tis_default_low_bound_and_detached_weight():
    terms = make_terms([0.25, 4.0], mask=[1, 1])
    pg = torch.ones(2, requires_grad=True)
    old = terms.old_log_probs.clone().requires_grad_()
    terms.pg_loss, terms.old_log_probs = pg * 1.0, old
    corrections.loss_correction(args=args(use_tis=True), terms=terms)  # tis_clip_low 0: 0.25 kept
    close(terms.pg_loss, [0.25, 2.0])
    terms.pg_loss.sum().backward()
    close(pg.grad, [0.25, 2.0])  # gradient flows through pg_loss, scaled by the weight
    assert old.grad is None  # ... and never through the weight


def test_icepop_masks_out_of_window_tokens_only_in_pg_loss():
    terms = make_terms([1.0, 3.0, 0.25, 6.0, 0.4], mask=[1, 1, 1, 1, 0])
    metrics = corrections.loss_correction(args=args(use_icepop=True), terms=terms)
    close(terms.pg_loss, [1.0, 3.0, 0.0, 0.0, 0.0])  # in-window tokens keep the ratio weight
    close(terms.loss_mask, [1, 1, 1, 1, 0])  # denominator untouched
    assert metrics == {"icepop_maskfrac": pytest.approx(2 / 4)}  # 0.25 and 6.0 of 4 masked tokens


def test_off_or_without_rollout_log_probs_is_a_no_op():
    terms = make_terms([3.0], mask=[1])
    assert corrections.loss_correction(args=args(), terms=terms) is None
    close(terms.pg_loss, [1.0])
    terms = make_terms([3.0], mask=[1], with_rollout=False)
    assert corrections.loss_correction(args=args(use_tis=True), terms=terms) is None
    close(terms.pg_loss, [1.0])


def test_hook_through_plugin_manager():
    pm = pluggy.PluginManager("miles")
    pm.add_hookspecs(hookspecs)
    pm.register(corrections)
    terms = make_terms([1.0, 3.0], mask=[1, 1])
    results = pm.hook.loss_correction(args=args(use_tis=True), terms=terms)
    assert results == [{"tis_clipfrac": 0.5, "tis_weight_mean": pytest.approx(1.5)}]
    close(terms.pg_loss, [1.0, 2.0])
