"""Train/rollout mismatch corrections of the policy loss, as the core's ``loss_correction`` hookimpls:
truncated importance sampling (``--use-tis``) and IcePop (``--use-icepop``).

Both weight each token by ``exp(old_log_probs - rollout_log_probs)``, the ratio between the trainer's
and the engine's probability of the sampled token, following slime / miles (``vanilla_tis_function``,
``icepop_function``).
"""

from __future__ import annotations

import argparse

import torch

from miles_core.plugins import hookimpl
from miles_core.train.losses import LossTerms


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A detached device scalar: the trainer reads every metric of a step with one host sync."""
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()


def _train_rollout_ratio(terms: LossTerms) -> torch.Tensor:
    # Detached: the correction is a fixed per-token weight, gradient flows only through pg_loss.
    return torch.exp(terms.old_log_probs.detach().float() - terms.rollout_log_probs.detach().float())


def apply_tis(terms: LossTerms, clip_low: float, clip_high: float) -> dict[str, float]:
    """Multiply ``terms.pg_loss`` by ``clamp(ratio, clip_low, clip_high)`` (truncated IS).

    Metrics over masked tokens: ``tis_clipfrac`` (share of tokens whose ratio was clamped) and
    ``tis_weight_mean`` (mean weight after clamping).
    """
    ratio = _train_rollout_ratio(terms)
    weight = ratio.clamp(min=clip_low, max=clip_high)
    terms.pg_loss = terms.pg_loss * weight
    mask = terms.loss_mask.float()
    return {
        "tis_clipfrac": _masked_mean((weight != ratio).float(), mask),
        "tis_weight_mean": _masked_mean(weight, mask),
    }


def apply_icepop(terms: LossTerms, low: float, high: float) -> dict[str, float]:
    """IcePop (Ring-1T): keep tokens whose ratio lies in ``[low, high]``, weighted by the ratio, and zero
    the loss of the rest.

    Only ``pg_loss`` is zeroed; ``loss_mask`` is left alone on purpose, so dropped tokens still count in
    the aggregation denominator (slime/miles keep the pre-correction mask for denominators), which keeps
    the loss scale independent of how many tokens were popped. Metric: ``icepop_maskfrac``.
    """
    ratio = _train_rollout_ratio(terms)
    keep = (ratio >= low) & (ratio <= high)
    terms.pg_loss = terms.pg_loss * torch.where(keep, ratio, torch.zeros_like(ratio))
    return {"icepop_maskfrac": _masked_mean((~keep).float(), terms.loss_mask.float())}


@hookimpl
def loss_correction(args: argparse.Namespace, terms: LossTerms) -> dict[str, float] | None:
    """The core's corrections: TIS with ``--use-tis``, IcePop with ``--use-icepop``; ``None`` when both
    are off or the batch carries no rollout log-probs (nothing to compare against)."""
    if not (args.use_tis or args.use_icepop) or terms.rollout_log_probs is None:
        return None
    metrics: dict[str, float] = {}
    if args.use_tis:
        metrics.update(apply_tis(terms, args.tis_clip_low, args.tis_clip))
    if args.use_icepop:
        metrics.update(apply_icepop(terms, args.icepop_low, args.icepop_high))
    return metrics
