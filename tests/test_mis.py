"""MIS / rejection sampling / OPSM (miles_core.train.mis), the CISPO loss, the unbiased KL, the Dr. GRPO
reducer and rejected-token denominators, each against values worked out by hand in the comments."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from approx import close, t

from miles_core.train import corrections, mis, reducers
from miles_core.train.losses import LossTerms, aggregate, cispo_loss, compute_approx_kl

LN = math.log


def mis_args(**kw) -> argparse.Namespace:
    base = dict(
        use_tis=True, tis_mode="truncate", tis_level="token", tis_lower_bound=0.5, tis_upper_bound=2.5,
        tis_clip=2.0, tis_clip_low=0.0, tis_batch_normalize=False, use_rs=False, rs_level="token",
        rs_lower_bound=0.5, rs_upper_bound=2.0, rs_veto_threshold=None, use_icepop=False,
        use_opsm=False, opsm_delta=1e-4, custom_tis_function_path=None, calculate_per_token_loss=False,
    )  # fmt: skip
    base.update(kw)
    return argparse.Namespace(**base)


# Two samples with train/rollout ratios s1 = [2, 0.5, 4] and s2 = [3]; every pg_loss is 1.
RATIOS = [[2.0, 0.5, 4.0], [3.0]]


def terms_for(ratios=RATIOS, mask=None) -> LossTerms:
    flat = [r for s in ratios for r in s]
    n = len(flat)
    old = torch.full((n,), -1.0)
    return LossTerms(
        log_probs=old.clone(), old_log_probs=old, advantages=torch.ones(n),
        loss_mask=t(*(mask or [1.0] * n)), pg_loss=torch.ones(n), lengths=[len(s) for s in ratios],
        rollout_log_probs=old - t(*[LN(r) for r in flat]),
    )  # fmt: skip


def run(args, terms):
    return corrections.loss_correction(args=args, terms=terms), terms


def test_token_truncate_weights_and_fraction():
    # min(w, 2.5): [2, 0.5, 2.5 | 2.5]; truncated: s1 1 of 3, s2 1 of 1 -> sample mean (1/3 + 1) / 2
    m, terms = run(mis_args(), terms_for())
    close(terms.pg_loss, [2.0, 0.5, 2.5, 2.5])
    close(terms.loss_mask, [1, 1, 1, 1])
    assert float(m["mis_tis_truncate_fraction"]) == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize(
    "level,s1_weight",
    [("sequence", 2.5), ("geometric", 4 ** (1 / 3))],  # seq: 2*0.5*4 = 4 -> truncated; geo: 4^(1/3)
)
def test_sequence_and_geometric_levels(level, s1_weight):
    _, terms = run(mis_args(tis_level=level), terms_for())
    close(terms.pg_loss, [s1_weight] * 3 + [2.5])


def test_clip_mode_bounds_both_sides():
    # clamp(w, 1.0, 2.5): [2, 1.0, 2.5 | 2.5]; low: s1 1/3; high: s1 1/3, s2 1
    m, terms = run(mis_args(tis_mode="clip", tis_lower_bound=1.0), terms_for())
    close(terms.pg_loss, [2.0, 1.0, 2.5, 2.5])
    assert float(m["mis_tis_clip_fraction_low"]) == pytest.approx((1 / 3 + 0) / 2, abs=1e-6)
    assert float(m["mis_tis_clip_fraction_high"]) == pytest.approx((1 / 3 + 1) / 2, abs=1e-6)


def test_mask_mode_rejects_outside_window_and_keeps_weights():
    # window [0.6, 2.5]: s1 keeps 2, drops 0.5 (low) and 4 (high); s2's 3 dropped; weights unchanged
    m, terms = run(mis_args(tis_mode="mask", tis_lower_bound=0.6), terms_for())
    close(terms.pg_loss, [2.0, 0.5, 4.0, 3.0])
    close(terms.loss_mask, [1, 0, 0, 0])
    assert float(m["mis_tis_mask_fraction_low"]) == pytest.approx((1 / 3) / 2, abs=1e-6)


def test_rejection_sampling_levels_and_veto():
    # token RS in [0.5, 2]: keeps 2 and 0.5 (inside, not on the edge by float luck: use 0.49/2.01)
    args = mis_args(use_tis=False, tis_mode=None, use_rs=True, rs_lower_bound=0.49, rs_upper_bound=2.01)
    _, terms = run(args, terms_for())
    close(terms.pg_loss, [1, 1, 1, 1])  # RS alone does not reweight
    close(terms.loss_mask, [1, 1, 0, 0])
    # geometric: s1's 4^(1/3) = 1.587 is inside, s2's 3 is not
    _, terms = run(mis_args(use_tis=False, tis_mode=None, use_rs=True, rs_level="geometric"), terms_for())
    close(terms.loss_mask, [1, 1, 1, 0])
    # the veto drops all of s1 for its token at ratio 1e-5 < 1e-4, even though RS keeps its others
    ratios = [[1.0, 1e-5, 1.0], [1.0]]
    args = mis_args(use_tis=False, tis_mode=None, use_rs=True, rs_lower_bound=1e-6, rs_veto_threshold=1e-4)
    m, terms = run(args, terms_for(ratios))
    close(terms.loss_mask, [0, 0, 0, 1])
    assert float(m["mis_rs_catastrophic_seq_fraction"]) == pytest.approx(0.5, abs=1e-6)
    assert float(m["mis_rs_catastrophic_token_fraction"]) == pytest.approx((1 / 3) / 2, abs=1e-6)


def test_batch_normalize_to_mean_one():
    # token level: truncated weights [2, .5, 2.5, 2.5] have mean 7.5 / 4 = 1.875
    _, terms = run(mis_args(tis_batch_normalize=True), terms_for())
    close(terms.pg_loss, [2 / 1.875, 0.5 / 1.875, 2.5 / 1.875, 2.5 / 1.875])
    # sequence level: both sequences truncated to 2.5 -> every weight 1
    _, terms = run(mis_args(tis_batch_normalize=True, tis_level="sequence"), terms_for())
    close(terms.pg_loss, [1, 1, 1, 1])


def test_vanilla_tis_inside_mis_and_trainer_log_probs():
    # --use-tis without --tis-mode but with --use-rs: TIS clamps to [--tis-clip-low, --tis-clip] = [0, 2]
    args = mis_args(tis_mode=None, use_rs=True, rs_lower_bound=0.1, rs_upper_bound=10.0)
    _, terms = run(args, terms_for())
    close(terms.pg_loss, [2.0, 0.5, 2.0, 2.0])
    # the ratio is the trainer's (train_log_probs), not the PPO ratio's old policy (the rollout's)
    terms = terms_for()
    terms.train_log_probs, terms.old_log_probs = terms.old_log_probs, terms.rollout_log_probs
    corrections.loss_correction(args=mis_args(), terms=terms)
    close(terms.pg_loss, [2.0, 0.5, 2.5, 2.5])


def test_custom_tis_function_contract(tmp_path):
    """A --custom-tis-function-path function gets slime's keyword arguments, per sample; its pg_loss and
    masks are taken, its per-token metrics averaged over the mask as it came in."""
    seen = {}

    def fn(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths):
        seen.update(n=len(train_log_probs), lens=response_lengths, total=total_lengths)
        masks = [m * t(*([0.0] + [1.0] * (len(m) - 1))) for m in loss_masks]  # drop each first token
        return pg_loss * 3.0, masks, {"mine": torch.cat([torch.full_like(m, 2.0) for m in loss_masks])}

    spec = "test_custom_tis_fn:fn"
    corrections._LOADED[spec] = fn
    terms = terms_for()
    terms.total_lengths = [10, 7]
    m = corrections.loss_correction(args=mis_args(tis_mode=None, custom_tis_function_path=spec), terms=terms)
    assert seen == {"n": 2, "lens": [3, 1], "total": [10, 7]}
    close(terms.pg_loss, [3, 3, 3, 3])
    close(terms.loss_mask, [0, 1, 1, 0])
    assert float(m["mine"]) == pytest.approx(2.0)


def test_opsm_drops_negative_advantage_sequences_that_drifted():
    # s1: adv < 0, mean(old - new) over its mask = mean(0.2, 0.0) = 0.1 > 1e-4 -> dropped
    # s2: adv < 0, old - new = -0.1 -> kept (the policy moved towards it);  s3: adv > 0 -> kept
    # s4: adv < 0, masked token's 5.0 ignored: mean over the mask = 0.0 -> kept
    logp = t(-1.2, -1.0, -0.9, -2.0, -1.0, -6.0)
    old = t(-1.0, -1.0, -1.0, -1.5, -1.0, -1.0)
    adv = t(-1, -1, -1, 1, -1, -1)
    mask = t(1, 1, 1, 1, 1, 0)
    keep, dropped = mis.opsm_keep(logp, old, adv, mask, [2, 1, 1, 2], 1e-4)
    close(keep, [0, 0, 1, 1, 1, 1])
    close(dropped, [1, 0, 0, 0])
    terms = LossTerms(logp, old, adv, mask, torch.ones(6), [2, 1, 1, 2])
    m = corrections.loss_correction(args=mis_args(use_tis=False, tis_mode=None, use_opsm=True), terms=terms)
    close(terms.pg_loss, [0, 0, 1, 1, 1, 1])
    assert float(m["opsm_clipfrac"]) == pytest.approx(0.25)


def test_cispo_value_and_gradient_through_log_probs():
    # ratios [2, 1, 0.5]; clip to [0.8, 1.28] -> [1.28, 1, 0.8]; A = [1, -1, 2]
    logp = t(LN(0.5), LN(0.5), LN(0.5)).requires_grad_()
    old = t(LN(0.25), LN(0.5), LN(1.0))
    loss, clipfrac, ppo_kl = cispo_loss(logp, old, t(1, -1, 2), eps_clip=0.2, eps_clip_high=0.28)
    ln_half = LN(0.5)
    close(loss.detach(), [-1.28 * ln_half, ln_half, -1.6 * ln_half])
    close(clipfrac, [1, 0, 1])
    close(ppo_kl, [-LN(2), 0.0, LN(2)])
    loss.sum().backward()
    close(logp.grad, [-1.28, 1.0, -1.6])  # -sg(clipped ratio) * A: clipped tokens keep their gradient
    with pytest.raises(ValueError, match="dual clip"):
        cispo_loss(logp, old, t(1, 1, 1), 0.2, 0.2, eps_clip_c=3.0)


def test_unbiased_kl_weights_then_clamps():
    # k1 = ln 2, weighted by 2 -> 2 ln 2
    close(compute_approx_kl(t(LN(0.5)), t(LN(0.25)), "k1", importance_ratio=t(2.0)), [2 * LN(2)])
    # k3 at log-ratio -2: e^2 - 3 = 4.389; x3 = 13.17: low_var_kl clamps the product to 10, k3 does not
    lp, ref = t(-3.0), t(-1.0)
    close(compute_approx_kl(lp, ref, "k3", importance_ratio=t(3.0)), [3 * (math.exp(2) - 3)], tol=1e-4)
    close(compute_approx_kl(lp, ref, "low_var_kl", importance_ratio=t(3.0)), [10.0])
    close(compute_approx_kl(lp, ref, "low_var_kl", importance_ratio=t(0.5)), [(math.exp(2) - 3) / 2])


def test_rejected_tokens_keep_their_denominator():
    # per-sample mean with token 2 rejected: (1 + 0) / 2 and (1 + 1) / 2 -> (0.5 + 1) / 2 samples
    vals, lens = t(1, 1, 1, 1), [2, 2]
    kept, came_in = t(1, 0, 1, 1), t(1, 1, 1, 1)
    assert float(aggregate(vals, kept, lens, False, denom_mask=came_in)) == pytest.approx(0.75)
    assert float(aggregate(vals, kept, lens, False)) == pytest.approx(1.0)
    assert float(aggregate(vals, kept, lens, True, denom_mask=came_in)) == pytest.approx(3 / 4)


def test_dr_grpo_reducer_divides_by_a_constant():
    x = t(1, 2, 3, 4)
    masks = [t(1, 1), t(1, 0)]
    reduce = reducers.get_pg_loss_reducer([5, 5], [2, 2], masks, False)
    assert float(reduce(x)) == pytest.approx((1 + 2 + 3) / 1000)
    assert float(reducers.get_pg_loss_reducer([5, 5], [2, 2], masks, True)(x)) == pytest.approx(6.0)
    assert float(reducers.constant_normaliser(4.0)([5, 5], [2, 2], masks)(x)) == pytest.approx(1.5)
