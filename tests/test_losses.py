"""Tests for miles_core.train.losses: KL estimators, clipped policy loss, GSPO ratio, aggregation,
log-probs / entropy from logits and mismatch metrics, each against values worked out by hand."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from approx import close, t

from miles_core.train.losses import (
    aggregate,
    check_loss_args,
    compute_approx_kl,
    entropy_from_logits,
    gspo_log_ratio,
    log_probs_and_entropy,
    log_probs_from_logits,
    mismatch_metrics,
    policy_loss,
)
from miles_core.types import UsageError

# ---- KL estimators (log_ratio = [0.5, -0.5]) -------------------------------------------------------------


def test_kl_estimators_by_hand():
    lp, ref = t(0.5, -0.2), t(0.0, 0.3)
    close(compute_approx_kl(lp, ref, "k1"), [0.5, -0.5])
    close(compute_approx_kl(lp, ref, "k2"), [0.125, 0.125])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5]  # 0.10653, 0.14872
    close(compute_approx_kl(lp, ref, "k3"), k3)
    close(compute_approx_kl(lp, ref, "low_var_kl"), k3)


def test_low_var_kl_clamps_but_k3_does_not():
    lp, ref = t(-20.0, 20.0), t(0.0, 0.0)
    # k3 at log_ratio -20 is e^20 - 21 (huge); at +20 it is e^-20 + 19.
    close(compute_approx_kl(lp, ref, "low_var_kl"), [10.0, 10.0])
    k3 = compute_approx_kl(lp, ref, "k3")
    assert k3[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert k3[1].item() == pytest.approx(19.0, abs=1e-4)


def test_kl_unknown_type():
    with pytest.raises(ValueError, match="k4"):
        compute_approx_kl(t(0.0), t(0.0), "k4")


# ---- policy loss -------------------------------------------------------------------------------------------


def test_policy_loss_branches():
    # ratios: 1.1 (unclipped), 1.5 (clipped high), 0.5 with A<0 (clipped low), 0.5 with A>0 (pessimistic
    # min keeps the unclipped -0.5)
    ratios = [1.1, 1.5, 0.5, 0.5]
    old = t(-1.0, -1.0, -1.0, -1.0)
    new = old + t(*[math.log(r) for r in ratios])
    adv = t(2.0, 1.0, -1.0, 1.0)
    loss, clipfrac, ppo_kl = policy_loss(new, old, adv, eps_clip=0.2, eps_clip_high=0.28)
    close(loss, [-2.2, -1.28, 0.8, -0.5])
    close(clipfrac, [0.0, 1.0, 1.0, 0.0])
    close(ppo_kl, [-math.log(r) for r in ratios])


def test_policy_loss_asymmetric_clip_high():
    old, new, adv = t(0.0), t(math.log(1.25)), t(1.0)
    loss, clipfrac, _ = policy_loss(new, old, adv, eps_clip=0.2, eps_clip_high=0.3)
    close(loss, [-1.25])  # 1.25 < 1.3: inside the wider upper bound
    close(clipfrac, [0.0])
    loss, clipfrac, _ = policy_loss(new, old, adv, eps_clip=0.2, eps_clip_high=None)  # falls back to 0.2
    close(loss, [-1.2])
    close(clipfrac, [1.0])


def test_policy_loss_dual_clip():
    old = t(0.0, 0.0, 0.0)
    new = t(math.log(5.0), math.log(5.0), math.log(2.0))
    adv = t(-1.0, 1.0, -1.0)
    plain, _, _ = policy_loss(new, old, adv, 0.2, 0.2)
    close(plain, [5.0, -1.2, 2.0])
    dual, _, _ = policy_loss(new, old, adv, 0.2, 0.2, eps_clip_c=3.0)
    close(dual, [3.0, -1.2, 2.0])  # only A<0 with loss above -A*c=3 is capped
    with pytest.raises(ValueError):
        policy_loss(new, old, adv, 0.2, 0.2, eps_clip_c=1.0)


def test_policy_loss_gradient_zero_when_clipped():
    old = t(0.0, 0.0)
    new = t(math.log(1.1), math.log(1.5)).requires_grad_()
    loss, _, _ = policy_loss(new, old, t(2.0, 1.0), 0.2, 0.2)
    loss.sum().backward()
    close(new.grad, [-2.0 * 1.1, 0.0])  # d(-A*ratio)/dlogp = -A*ratio


# ---- GSPO ------------------------------------------------------------------------------------------------


def test_gspo_log_ratio_value_and_gradient():
    old = t(0.0, 0.0, 0.0, 0.0, 0.0)
    new = t(0.2, 0.4, 0.1, 0.9, 0.4).requires_grad_()
    mask = t(1, 1, 1, 0, 1)
    lr = gspo_log_ratio(new, old, mask, [2, 3])
    close(lr, [0.3, 0.3, 0.25, 0.25, 0.25])  # masked mean per sample; the 0.9 is masked out
    torch.exp(lr).sum().backward()
    # GSPO-token: each token's gradient is its sequence's ratio
    close(new.grad, [math.exp(0.3)] * 2 + [math.exp(0.25)] * 3)


def test_gspo_feeds_policy_loss_clip():
    old, new, mask = t(0.0, 0.0), t(0.5, 0.3), t(1, 1)
    lr = gspo_log_ratio(new, old, mask, [2])
    loss, clipfrac, ppo_kl = policy_loss(new, old, t(1.0, 1.0), 0.2, 0.2, log_ratio=lr)
    close(loss, [-1.2, -1.2])  # seq ratio e^0.4 = 1.49 clipped to 1.2 for both tokens
    close(clipfrac, [1.0, 1.0])
    close(ppo_kl, [-0.4, -0.4])


# ---- aggregation -----------------------------------------------------------------------------------------


def test_aggregate_per_token_and_per_sample():
    values, mask, lengths = t(1, 2, 3, 4, 5), t(1, 1, 0, 0, 1), [2, 3]
    assert aggregate(values, mask, lengths, per_token=True).item() == pytest.approx(8 / 3)
    assert aggregate(values, mask, lengths, per_token=True, denom=8).item() == pytest.approx(1.0)
    # sample means 1.5 and 5.0
    assert aggregate(values, mask, lengths, per_token=False).item() == pytest.approx(6.5 / 2)
    assert aggregate(values, mask, lengths, per_token=False, denom=4).item() == pytest.approx(6.5 / 4)


def test_aggregate_micro_batches_sum_to_step_mean():
    values, mask, lengths = t(1, 2, 3, 4, 5, 6), t(1, 1, 1, 0, 1, 1), [1, 2, 3]
    for per_token, denom in ((True, 5.0), (False, 3.0)):
        whole = aggregate(values, mask, lengths, per_token, denom)
        parts = aggregate(values[:3], mask[:3], [1, 2], per_token, denom) + aggregate(
            values[3:], mask[3:], [3], per_token, denom
        )
        assert parts.item() == pytest.approx(whole.item())
    assert whole.item() == pytest.approx((1 + 2.5 + 5.5) / 3)


def test_aggregate_rejects_wrong_lengths():
    with pytest.raises(ValueError):
        aggregate(t(1, 2, 3), t(1, 1, 1), [2, 2], per_token=True)


# ---- log-probs and entropy -------------------------------------------------------------------------------


def test_entropy_and_log_probs_against_manual_softmax():
    logits = torch.tensor([[0.0, math.log(2), math.log(3)], [1000.0, 1000.0, -1000.0]])
    p = [1 / 6, 2 / 6, 3 / 6]
    close(entropy_from_logits(logits), [-sum(x * math.log(x) for x in p), math.log(2)])
    close(log_probs_from_logits(logits, torch.tensor([2, 1])), [math.log(0.5), math.log(0.5)])


def test_entropy_keeps_leading_shape():
    logits = torch.zeros(2, 3, 4)
    ent = entropy_from_logits(logits)
    assert ent.shape == (2, 3)
    assert torch.allclose(ent, torch.full((2, 3), math.log(4)))


def test_chunked_bf16_matches_fp32_with_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 11).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 11, (7,))
    lp, ent = log_probs_and_entropy(x, targets, chunk_rows=3)
    assert lp.dtype == torch.float32
    (2.0 * lp.sum() + 0.5 * ent.sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    xf = x.detach().float().requires_grad_()
    logsm = xf - xf.exp().sum(-1, keepdim=True).log()
    ref_lp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    (2.0 * ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(x.grad.float(), xf.grad, atol=1e-2)  # bf16 gradient rounding


# ---- mismatch metrics and flag checks --------------------------------------------------------------------


def test_mismatch_metrics_by_hand():
    train, rollout, mask = t(-1.0, -2.0, -0.5), t(-1.2, -2.0, -3.0), t(1, 1, 0)
    m = mismatch_metrics(train, rollout, mask)
    assert m["train_rollout_logprob_abs_diff"] == pytest.approx(0.1, abs=1e-6)
    # r = p_train / p_rollout = e^0.2 on token 0, 1 on token 1; k3 = r - 1 - log r
    assert m["train_rollout_kl"] == pytest.approx((math.exp(0.2) - 1 - 0.2) / 2, abs=1e-6)


def test_check_loss_args_runs_at_parse_time():
    from miles_core.args import build_parser, parse_args

    def flags(*argv: str) -> argparse.Namespace:
        return build_parser().parse_args(list(argv))

    check_loss_args(flags("--eps-clip-c", "3", "--kl-loss-type", "low_var_kl", "--use-tis"))
    cases = [
        (["--eps-clip-c", "1.0"], "eps-clip-c"),
        (["--use-tis", "--use-icepop"], "both"),
        (["--use-tis", "--tis-clip-low", "3", "--tis-clip", "2"], "tis-clip-low is above"),
        (["--use-icepop", "--icepop-low", "5", "--icepop-high", "5"], "icepop-low must be below"),
    ]
    for argv, match in cases:
        with pytest.raises(UsageError, match=match):
            check_loss_args(flags(*argv))
        with pytest.raises(UsageError, match=match):  # the parser of `miles train` runs the check
            parse_args(argv)


def test_per_sample_reductions_match_a_loop_with_empty_samples_and_tensor_lengths():
    g = torch.Generator().manual_seed(0)
    lengths = [3, 0, 5, 1]
    values = torch.randn(9, generator=g, requires_grad=True)
    mask = (torch.rand(9, generator=g) > 0.3).float()
    ref = (
        sum((v * m).sum() / m.sum().clamp(min=1) for v, m in zip(values.split(lengths), mask.split(lengths)))
        / 4
    )
    for lens in (lengths, torch.tensor(lengths)):
        got = aggregate(values, mask, lens, per_token=False)
        assert torch.allclose(got, ref, atol=1e-6)
        (gv,) = torch.autograd.grad(got, values)
        (gr,) = torch.autograd.grad(ref, values, retain_graph=True)
        assert torch.allclose(gv, gr, atol=1e-6)
    old = torch.randn(9, generator=g)
    lr = gspo_log_ratio(values, old, mask, torch.tensor(lengths))
    seq = [((v.detach() - o) * m).sum() / m.sum().clamp(min=1) for v, o, m in
           zip(values.split(lengths), old.split(lengths), mask.split(lengths))]  # fmt: skip
    assert torch.allclose(lr.detach(), torch.cat([s.expand(n) for s, n in zip(seq, lengths)]), atol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
def test_fp32_gradient_matches_autograd(fused):
    """fp32 logits: the forward must not shift them in place (the backward re-reads them); `fused`
    compiles the chunk maths and must give the same numbers."""
    torch.manual_seed(1)
    x = (3 * torch.randn(6, 13)).requires_grad_()
    targets = torch.randint(0, 13, (6,))
    lp, ent = log_probs_and_entropy(x * 1.0, targets, chunk_rows=4, fused=fused)
    (2.0 * lp.sum() + 0.5 * ent.sum()).backward()
    ours, x.grad = x.grad, None
    logsm = torch.log_softmax(x, -1)
    ref_lp, ref_ent = logsm.gather(-1, targets[:, None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)
    (2.0 * ref_lp.sum() + 0.5 * ref_ent.sum()).backward()
    assert torch.allclose(lp, ref_lp, atol=1e-5) and torch.allclose(ent, ref_ent, atol=1e-5)
    assert torch.allclose(ours, x.grad, atol=1e-5)
