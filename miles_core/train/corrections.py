"""Train/rollout mismatch corrections of the policy loss, as the core's ``loss_correction`` hookimpl:
truncated importance sampling (``--use-tis``), MIS and rejection sampling (``--tis-mode``, ``--use-rs``,
`miles_core.train.mis`), a ``--custom-tis-function-path`` function, IcePop (``--use-icepop``) and
off-policy sequence masking (``--use-opsm``).

TIS and IcePop weight each token by ``exp(train_log_probs - rollout_log_probs)``, the ratio between the
trainer's and the engine's probability of the sampled token, following slime / miles
(``vanilla_tis_function``, ``icepop_function``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from miles_core.custom import load_function
from miles_core.plugins import hookimpl
from miles_core.train import mis
from miles_core.train.losses import LossTerms, aggregate
from miles_core.types import UsageError

_LOADED: dict[str, Callable] = {}  # --custom-tis-function-path spec -> function (a file is run once)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A detached device scalar: the trainer reads every metric of a step with one host sync."""
    return ((x * mask).sum() / mask.sum().clamp(min=1)).detach()


def _train_rollout_ratio(terms: LossTerms) -> torch.Tensor:
    # Detached: the correction is a fixed per-token weight, gradient flows only through pg_loss.
    return torch.exp(terms.trainer_log_probs.detach().float() - terms.rollout_log_probs.detach().float())


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


def tis_function(args: argparse.Namespace) -> Callable | None:
    """The TIS function of the run: ``--custom-tis-function-path``, the built-in MIS (``--tis-mode`` or
    ``--use-rs``), or None for the plain ``--use-tis`` clamp."""
    spec = args.custom_tis_function_path
    if spec:
        if spec not in _LOADED:
            _LOADED[spec] = load_function(spec, "compute_tis_weights", flag="--custom-tis-function-path")
        return _LOADED[spec]
    if args.tis_mode is not None or args.use_rs:
        return mis.compute_mis_weights
    return None


def apply_tis_function(args: argparse.Namespace, terms: LossTerms, fn: Callable) -> dict[str, float]:
    """Run a TIS function (``protocols.TISFunction``) on ``terms``: its ``pg_loss`` replaces the terms',
    its masks are multiplied into ``terms.loss_mask``, and its per-token metrics are averaged over the
    mask as it came in (a 0-d metric is taken as the micro-batch's value)."""
    lens = list(terms.lengths)
    before = terms.loss_mask
    pg, masks, metrics = fn(
        args,
        pg_loss=terms.pg_loss,
        train_log_probs=list(terms.trainer_log_probs.detach().float().split(lens)),
        rollout_log_probs=list(terms.rollout_log_probs.detach().float().split(lens)),
        loss_masks=list(before.split(lens)),
        total_lengths=terms.total_lengths,
        response_lengths=lens,
    )
    name = args.custom_tis_function_path or "the MIS function"
    if not isinstance(pg, torch.Tensor) or pg.shape != terms.pg_loss.shape or len(masks) != len(lens):
        raise UsageError(
            f"{name} must return (pg_loss shaped like its input [num_tokens], one mask per sample, metrics); "
            "fix its return value."
        )
    terms.pg_loss = pg
    terms.loss_mask = before * torch.cat([m.float().reshape(-1) for m in masks]).to(before.device)
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        value = torch.as_tensor(value).detach().float()
        if value.numel() == before.numel() and value.dim() == 1:
            value = aggregate(value.to(before.device), before, lens, args.calculate_per_token_loss)
        out[key] = value.reshape(())
    return out


def apply_opsm(args: argparse.Namespace, terms: LossTerms) -> dict[str, float]:
    """Zero ``pg_loss`` of the tokens OPSM drops (`mis.opsm_keep`); metric ``opsm_clipfrac``: the mean
    over samples of the share of a sample's tokens dropped (for GRPO, the share of dropped samples)."""
    keep, dropped = mis.opsm_keep(
        terms.log_probs, terms.old_log_probs, terms.advantages, terms.loss_mask, list(terms.lengths),
        args.opsm_delta,
    )  # fmt: skip
    terms.pg_loss = terms.pg_loss * keep
    return {"opsm_clipfrac": dropped.mean().detach() if dropped.numel() else torch.zeros(())}


@hookimpl
def loss_correction(args: argparse.Namespace, terms: LossTerms) -> dict[str, float] | None:
    """The core's corrections, in slime's order: OPSM (``--use-opsm``), then TIS / MIS / a custom TIS
    function (``--use-tis``, ``--use-rs``), then IcePop (``--use-icepop``). The rollout-based ones are
    skipped when the batch carries no rollout log-probs; ``None`` when nothing applied."""
    metrics: dict[str, float] = {}
    if args.use_opsm:
        metrics.update(apply_opsm(args, terms))
    if terms.rollout_log_probs is None:
        return metrics or None
    if args.use_tis or args.use_rs:
        fn = tis_function(args)
        if fn is None:
            metrics.update(apply_tis(terms, args.tis_clip_low, args.tis_clip))
        else:
            metrics.update(apply_tis_function(args, terms, fn))
    if args.use_icepop:
        metrics.update(apply_icepop(terms, args.icepop_low, args.icepop_high))
    return metrics or None
