"""Advantage estimators (GRPO / GSPO, REINFORCE++, REINFORCE++-baseline) and the core's ``advantage``
hookimpl that picks one by ``--advantage-estimator``.

Formulas follow slime (`slime/utils/ppo_utils.py`, `_post_process_rewards` in `slime/ray/rollout.py`):
group statistics use ``torch.std`` (unbiased) + 1e-6, whitening is masked with Bessel's correction.
"""

from __future__ import annotations

import argparse

import pluggy
import torch

from miles_core.train.losses import compute_approx_kl
from miles_core.types import TrainBatch, UsageError

try:  # the shared marker, once miles_core.plugins exists; an identical local one until then
    from miles_core.plugins import hookimpl
except ImportError:  # pragma: no cover - depends on what else is installed
    hookimpl = pluggy.HookimplMarker("miles")

ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def group_normalize(
    rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO reward normalisation: ``(r - mean_group) / (std_group + eps)`` over consecutive groups of
    ``group_size`` samples (the n samples of one prompt); the division is skipped when
    ``std_normalize`` is off (Dr. GRPO) or groups have one sample (the std is undefined)."""
    n = rewards.numel()
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} rewards do not split into groups of {group_size} samples")
    grouped = rewards.float().reshape(-1, group_size)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if std_normalize and group_size > 1:
        centred = centred / (grouped.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(n)


def masked_whiten(
    values: list[torch.Tensor], loss_masks: list[torch.Tensor], eps: float = 1e-8
) -> list[torch.Tensor]:
    """Shift and scale per-sample tensors to zero mean, unit variance over all masked tokens of the batch
    (statistics from masked tokens only, unbiased variance; every token is transformed)."""
    if not values:
        return []
    flat = torch.cat(values).float()
    mask = torch.cat(loss_masks).float()
    count = mask.sum()
    if count == 0:
        return [v.clone() for v in values]
    mean = (flat * mask).sum() / count
    var = ((flat - mean).square() * mask).sum() / count
    if count >= 2:
        var = var * count / (count - 1)
    whitened = (flat - mean) * torch.rsqrt(var + eps)
    return list(whitened.split([v.numel() for v in values]))


def grpo_advantages(
    rewards: torch.Tensor, loss_masks: list[torch.Tensor], group_size: int, std_normalize: bool = True
) -> list[torch.Tensor]:
    """GRPO (and GSPO) advantages: each sample's group-normalised reward broadcast over its response
    tokens. ``loss_masks`` only give the per-sample lengths; the loss applies the mask."""
    normed = group_normalize(rewards, group_size, std_normalize)
    return _broadcast(normed, loss_masks)


def _broadcast(values: torch.Tensor, loss_masks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        torch.full((m.numel(),), float(v), dtype=torch.float32, device=m.device)
        for v, m in zip(values, loss_masks, strict=True)
    ]


def _discounted_returns(token_rewards: list[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """G_t = r_t + gamma * G_{t+1} per sample: padded to [B, T], one vectorised step per position
    (gamma^-t tricks overflow on long responses), or a flipped cumsum when gamma is 1."""
    if not token_rewards:
        return []
    lengths = [r.numel() for r in token_rewards]
    padded = torch.nn.utils.rnn.pad_sequence(token_rewards, batch_first=True)  # zeros after the end
    if gamma == 1.0:
        out = padded.flip(-1).cumsum(-1).flip(-1)
    else:
        out = torch.empty_like(padded)
        running = padded.new_zeros(padded.shape[0])
        for step in range(padded.shape[1] - 1, -1, -1):
            running = padded[:, step] + gamma * running
            out[:, step] = running
    return [row[:n] for row, n in zip(out, lengths, strict=True)]


def reinforce_plus_plus_returns(
    rewards: torch.Tensor,
    kl: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    kl_coef: float,
    gamma: float = 1.0,
    whiten: bool = True,
) -> list[torch.Tensor]:
    """REINFORCE++ (arXiv 2501.03262): per-token reward ``-kl_coef * kl`` on masked tokens, the sample's
    reward added at its last masked token, discounted returns-to-go with ``gamma``; then (``whiten``)
    whitened over all masked tokens of the batch, which is what the policy loss uses as advantages."""
    token_rewards = []
    for reward, k, m in zip(rewards.float(), kl, loss_masks, strict=True):
        r = -kl_coef * k.float() * m.float()
        live = m.nonzero()
        if live.numel():  # a fully masked sample contributes nothing to the loss anyway
            r[live[-1, 0]] += reward.to(r.device)
        token_rewards.append(r)
    returns = _discounted_returns(token_rewards, gamma)
    return masked_whiten(returns, loss_masks) if whiten else returns


def reinforce_plus_plus_baseline_advantages(
    rewards: torch.Tensor,
    group_size: int,
    kl: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    kl_coef: float,
    whiten: bool = True,
) -> list[torch.Tensor]:
    """REINFORCE++-baseline: ``(reward - group mean)`` broadcast over the response, minus
    ``kl_coef * kl`` per token, then (``whiten``) whitened over the batch's masked tokens."""
    centred = group_normalize(rewards, group_size, std_normalize=False)
    advs = _broadcast_minus_kl(centred, kl, kl_coef)
    return masked_whiten(advs, loss_masks) if whiten else advs


def _broadcast_minus_kl(values: torch.Tensor, kl: list[torch.Tensor], kl_coef: float) -> list[torch.Tensor]:
    return [float(v) - kl_coef * k.float() for v, k in zip(values, kl, strict=True)]


def _reward_shaping_kl(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """Per-token KL(policy || ref) of the sampled tokens for reward shaping; zeros when ``--kl-coef`` is 0
    or either side's log-probs are missing (slime skips the ref forward then)."""
    log_probs = batch.old_log_probs if batch.old_log_probs is not None else batch.rollout_log_probs
    if getattr(args, "kl_coef", 0.0) == 0 or log_probs is None or batch.ref_log_probs is None:
        return [torch.zeros(m.numel(), dtype=torch.float32, device=m.device) for m in batch.loss_masks]
    kl_type = getattr(args, "kl_loss_type", "k1")
    return [
        compute_approx_kl(lp, ref, kl_type) for lp, ref in zip(log_probs, batch.ref_log_probs, strict=True)
    ]


def _group_rewards(args: argparse.Namespace) -> tuple[bool, bool]:
    """(subtract the group mean?, divide by the group std?) from the flags, slime's semantics."""
    centre = getattr(args, "rewards_normalization", True) and not getattr(
        args, "disable_rewards_normalization", False
    )
    scale = not getattr(args, "disable_grpo_std_normalization", False) and getattr(
        args, "grpo_std_normalization", True
    )
    return centre, scale and getattr(args, "n_samples_per_prompt", 1) > 1


def compute_advantages(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """Per-token float32 advantages ``[response_length]`` per sample for ``--advantage-estimator``."""
    est = args.advantage_estimator
    group = getattr(args, "n_samples_per_prompt", 1)
    rewards, masks = batch.rewards.float(), batch.loss_masks
    centre, scale = _group_rewards(args)
    if est != "reinforce_plus_plus" and centre and len(batch) % group:
        raise UsageError(
            f"the batch has {len(batch)} samples, not a multiple of --n-samples-per-prompt {group}; "
            "keep every prompt's group whole (check the custom generate function or the dynamic filter)."
        )
    if est in ("grpo", "gspo"):
        advs = (
            grpo_advantages(rewards, masks, group, std_normalize=scale)
            if centre
            else _broadcast(rewards, masks)
        )
        return masked_whiten(advs, masks) if getattr(args, "normalize_advantages", False) else advs
    kl = _reward_shaping_kl(args, batch)
    kl_coef = getattr(args, "kl_coef", 0.0)
    if est == "reinforce_plus_plus":
        return reinforce_plus_plus_returns(rewards, kl, masks, kl_coef, getattr(args, "gamma", 1.0))
    if est == "reinforce_plus_plus_baseline":
        if not centre:  # --disable-rewards-normalization: no group baseline, only the KL shaping
            return masked_whiten(_broadcast_minus_kl(rewards, kl, kl_coef), masks)
        return reinforce_plus_plus_baseline_advantages(rewards, group, kl, masks, kl_coef)
    raise UsageError(
        f"--advantage-estimator {est!r} is not built into the core; choose one of {', '.join(ESTIMATORS)} "
        "or install the plugin that provides it."
    )


@hookimpl
def advantage(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """The core's estimators (see ``compute_advantages``). REINFORCE++ variants always whiten (slime
    requires ``--normalize-advantages`` for them); GRPO/GSPO whiten only with ``--normalize-advantages``."""
    return compute_advantages(args, batch)
