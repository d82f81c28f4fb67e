"""Masked / truncated importance sampling (MIS) and rejection sampling of train/rollout mismatch, and
off-policy sequence masking (OPSM).

`compute_mis_weights` is a TIS function (``protocols.TISFunction``, the signature of slime's
``vanilla_tis_function``): the core runs it for ``--use-tis --tis-mode ...`` or ``--use-rs``, and it may
be named by ``--custom-tis-function-path miles_core.train.mis:compute_mis_weights`` as in miles' example
``train_infer_mismatch_helper/mis.py``, whose config keys are this module's flags (``--tis-level``,
``--tis-mode``, ``--tis-lower-bound``, ``--tis-upper-bound``, ``--use-rs``, ``--rs-level``,
``--rs-lower-bound``, ``--rs-upper-bound``, ``--rs-veto-threshold``, ``--tis-batch-normalize``).

With ``d_t = log pi_train(y_t) - log pi_rollout(y_t)`` over a sample's masked tokens, the log IS weight
is ``d_t`` (token level), ``sum_t d_t`` (sequence: the product of the ratios) or ``mean_t d_t``
(geometric), clamped to [-20, 20] before ``exp``. Modes: ``truncate`` min(w, upper); ``clip``
clamp(w, lower, upper); ``mask`` keeps w and rejects tokens with w outside [lower, upper]. Rejected
tokens leave the loss numerators; the denominators keep them (see ``LossTerms``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

_SAFETY = 20.0  # |log weight| bound: exp() of more overflows float32 (miles' SAFETY_BOUND)


def level_log_ratio(diff: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """One sample's log IS weight per token: ``diff`` itself (``token``), or its masked sum
    (``sequence``) or masked mean (``geometric``) broadcast over the sample."""
    if level == "token":
        return diff
    total = (diff * mask).sum()
    if level == "sequence":
        return total.expand_as(diff)
    if level == "geometric":
        return (total / mask.sum().clamp(min=1)).expand_as(diff)
    raise ValueError(f"unknown IS level {level!r}; expected token, sequence or geometric")


def _add(metrics: dict[str, list[torch.Tensor]], key: str, value: torch.Tensor) -> None:
    metrics.setdefault(key, []).append(value.detach().float())


def _tis_weight(args: argparse.Namespace, diff, mask, keep, metrics) -> tuple[torch.Tensor, torch.Tensor]:
    """(IS weight, kept-token mask) of one sample under ``--use-tis`` (and ``--tis-mode``)."""
    if not args.use_tis:
        return torch.ones_like(diff), keep
    if args.tis_mode is None:  # vanilla TIS: clamp to [--tis-clip-low, --tis-clip]
        w = torch.exp(diff.clamp(-_SAFETY, _SAFETY))
        _add(metrics, "tis_clipfrac", ((w < args.tis_clip_low) | (w > args.tis_clip)).float())
        return w.clamp(args.tis_clip_low, args.tis_clip), keep
    w = torch.exp(level_log_ratio(diff, mask, args.tis_level).clamp(-_SAFETY, _SAFETY))
    low, high = args.tis_lower_bound, args.tis_upper_bound
    if args.tis_mode == "truncate":
        _add(metrics, "tis_truncate_fraction", (w > high).float())
        return w.clamp(max=high), keep
    _add(metrics, f"tis_{args.tis_mode}_fraction_low", (w < low).float())
    _add(metrics, f"tis_{args.tis_mode}_fraction_high", (w > high).float())
    if args.tis_mode == "clip":
        return w.clamp(low, high), keep
    return w, keep * ((w >= low) & (w <= high)).float()  # mask: MIS


def _rejection(args: argparse.Namespace, diff, mask, keep, metrics) -> torch.Tensor:
    """The kept-token mask after ``--use-rs`` (ratio window at ``--rs-level``, then the veto)."""
    r = torch.exp(level_log_ratio(diff, mask, args.rs_level).clamp(-_SAFETY, _SAFETY))
    low, high = args.rs_lower_bound, args.rs_upper_bound
    _add(metrics, "rs_mask_fraction_low", (r < low).float())
    _add(metrics, "rs_mask_fraction_high", (r > high).float())
    keep = keep * ((r >= low) & (r <= high)).float()
    if args.rs_veto_threshold is not None:
        bad = (diff < math.log(args.rs_veto_threshold)) & mask.bool()
        _add(metrics, "rs_catastrophic_token_fraction", bad.float())
        _add(metrics, "rs_catastrophic_seq_fraction", bad.any().float().expand_as(diff))
        keep = keep * (~bad.any()).float()
    return keep


def compute_mis_weights(
    args: argparse.Namespace,
    *,
    pg_loss: torch.Tensor,
    train_log_probs: list[torch.Tensor],
    rollout_log_probs: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
    """MIS/TIS weights and rejection masks of one micro-batch (``protocols.TISFunction``).

    :returns: ``pg_loss`` times the (detached) weights, each sample's mask with rejected tokens zeroed,
        and per-token metrics ``[num_tokens]`` (``mis_`` prefixed) that the trainer averages over the
        mask as it came in.
    """
    metrics: dict[str, list[torch.Tensor]] = {}
    weights, keeps = [], []
    for train, rollout, mask in zip(train_log_probs, rollout_log_probs, loss_masks, strict=True):
        mask = mask.float()
        diff = train.detach().float() - rollout.detach().float()
        w, keep = _tis_weight(args, diff, mask, mask.clone(), metrics)
        if args.use_rs:
            keep = _rejection(args, diff, mask, keep, metrics)
        weights.append(w * mask)
        keeps.append(keep)
    if args.tis_batch_normalize and weights:
        if args.tis_level == "token":
            total = sum((w * m.float()).sum() for w, m in zip(weights, loss_masks))
            mean = total / max(float(sum(m.float().sum() for m in loss_masks)), 1.0)
        else:  # one weight per sequence: the mean over sequences
            per_seq = [
                (w * m.float()).sum() / m.float().sum().clamp(min=1) for w, m in zip(weights, loss_masks)
            ]
            mean = sum(per_seq) / len(per_seq)
        if mean > 1e-8:
            weights = [w / mean for w in weights]
        for w in weights:
            _add(metrics, "batch_norm_factor", (mean if mean > 1e-8 else torch.ones(())).expand_as(w))
    for w in weights:
        _add(metrics, "is_ratio_mean_final", w)
    flat = torch.cat(weights).to(pg_loss.device) if weights else pg_loss.new_zeros(0)
    out = {f"mis_{k}": torch.cat(v) for k, v in metrics.items()}
    return pg_loss * flat.detach(), keeps, out


def opsm_keep(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    lengths: list[int],
    delta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Off-policy sequence masking (slime's ``compute_opsm_mask``, DeepSeek-V3.2).

    A sample's ``seq_kl`` is the masked mean of ``old_log_probs - log_probs``; a token is dropped when
    its advantage is negative and its sample's ``seq_kl > delta``. Returns ``(keep [num_tokens],
    masked [num_samples])``: 1.0 keeps a token; per sample, the fraction of its masked tokens dropped.
    """
    keep, masked = [], []
    parts = zip(
        log_probs.detach().float().split(lengths), old_log_probs.float().split(lengths),
        advantages.float().split(lengths), loss_mask.float().split(lengths), strict=True,
    )  # fmt: skip
    for lp, old, adv, m in parts:
        seq_kl = ((old - lp) * m).sum() / m.sum().clamp(min=1)
        drop = ((adv < 0) & (seq_kl > delta)).float()
        keep.append(1.0 - drop)
        masked.append((drop * m).sum() / m.sum().clamp(min=1))
    empty = log_probs.new_zeros(0)
    return (torch.cat(keep) if keep else empty), (torch.stack(masked) if masked else empty)
