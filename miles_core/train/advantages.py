"""Advantage estimators (GRPO / GSPO, REINFORCE++, REINFORCE++-baseline), registered under the
``miles.advantages`` entry-point group, and the core's ``advantage`` hookimpl that asks the one
``--advantage-estimator`` names.

An estimator computes per-token advantages and, like GSPO, may supply its own policy log-ratio for the
clipped loss (``protocols.AdvantageEstimator``); a plugin adds one by registering a class in that group.
Groups are the consecutive samples sharing a ``group_index`` (a generate function may return several
samples per prompt sample, so groups need not be ``--n-samples-per-prompt`` long).

Formulas follow slime (`slime/utils/ppo_utils.py`, `_post_process_rewards` in `slime/ray/rollout.py`):
group statistics use ``torch.std`` (unbiased) + 1e-6, whitening is masked with Bessel's correction.
"""

from __future__ import annotations

import argparse

import torch

from miles_core import drivers
from miles_core.plugins import hookimpl
from miles_core.train.losses import cispo_loss, compute_approx_kl, gspo_log_ratio
from miles_core.types import TrainBatch, UsageError


def group_normalize(
    rewards: torch.Tensor, group_size: int | list[int], std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO reward normalisation: ``(r - mean_group) / (std_group + eps)`` over consecutive groups of
    ``group_size`` samples (the samples of one prompt; a list gives each group's size); the division is
    skipped when ``std_normalize`` is off (Dr. GRPO) and for one-sample groups (the std is undefined)."""
    n = rewards.numel()
    sizes = group_size if isinstance(group_size, list) else [group_size] * (n // max(group_size, 1))
    if min(sizes, default=1) < 1 or sum(sizes) != n:
        raise ValueError(f"{n} rewards do not split into groups of {group_size} samples")
    out = []
    for chunk in rewards.float().split(sizes):
        centred = chunk - chunk.mean()
        if std_normalize and chunk.numel() > 1:
            centred = centred / (chunk.std() + eps)
        out.append(centred)
    return torch.cat(out) if out else rewards.float()


def group_sizes(batch: TrainBatch, default: int) -> list[int]:
    """Sizes of the runs of consecutive samples sharing a ``group_index`` (``default``-sized runs when
    the samples carry none)."""
    ids = [s.group_index for s in batch.samples]
    if any(i is None for i in ids):
        if len(ids) % default:
            raise UsageError(
                f"the batch has {len(ids)} samples, not a multiple of --n-samples-per-prompt {default}, "
                "and they carry no group_index; keep every prompt's group whole."
            )
        return [default] * (len(ids) // default)
    sizes: list[int] = []
    for i, g in enumerate(ids):
        if i and g == ids[i - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


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
    rewards: torch.Tensor,
    loss_masks: list[torch.Tensor],
    group_size: int | list[int],
    std_normalize: bool = True,
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
    group_size: int | list[int],
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
    if args.kl_coef == 0 or log_probs is None or batch.ref_log_probs is None:
        return [torch.zeros(m.numel(), dtype=torch.float32, device=m.device) for m in batch.loss_masks]
    return [
        compute_approx_kl(lp, ref, args.kl_loss_type)
        for lp, ref in zip(log_probs, batch.ref_log_probs, strict=True)
    ]


class GRPO:
    """``grpo``: each sample's group-normalised reward over its response tokens (mean only with
    ``--disable-grpo-std-normalization``, the raw reward with ``--disable-rewards-normalization``),
    whitened over the batch with ``--normalize-advantages``; the token-level PPO ratio."""

    group_relative = True  # compares each sample with its group: one sample per prompt learns nothing

    def advantages(self, args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
        rewards, masks = batch.rewards.float(), batch.loss_masks
        if args.disable_rewards_normalization:
            advs = _broadcast(rewards, masks)
        else:
            sizes = group_sizes(batch, args.n_samples_per_prompt)
            advs = grpo_advantages(
                rewards, masks, sizes, std_normalize=not args.disable_grpo_std_normalization
            )
        return masked_whiten(advs, masks) if args.normalize_advantages else advs

    def policy_log_ratio(self, *terms: torch.Tensor) -> torch.Tensor | None:
        """The log-ratio of the clipped loss from (log_probs, old_log_probs, loss_mask, lengths), or None
        for the per-token ``log_probs - old_log_probs``."""
        return None


class GSPO(GRPO):
    """``gspo``: GRPO's advantages with GSPO's sequence-level importance ratio (`gspo_log_ratio`)."""

    policy_log_ratio = staticmethod(gspo_log_ratio)


class CISPO(GRPO):
    """``cispo`` (slime's name; MiniMax-M1): GRPO's advantages with the CISPO loss (`cispo_loss`): the
    importance ratio clipped under stop-gradient weights ``-A * log_probs``, so no token loses its
    gradient to the clip. An estimator may supply ``policy_loss`` like this to replace the PPO loss."""

    policy_loss = staticmethod(cispo_loss)


class ReinforcePlusPlus(GRPO):
    """``reinforce_plus_plus``: discounted returns of the reward (minus ``--kl-coef`` x KL per token),
    whitened over the batch's masked tokens."""

    group_relative = False

    def advantages(self, args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
        kl = _reward_shaping_kl(args, batch)
        return reinforce_plus_plus_returns(
            batch.rewards.float(), kl, batch.loss_masks, args.kl_coef, args.gamma
        )


class ReinforcePlusPlusBaseline(GRPO):
    """``reinforce_plus_plus_baseline``: (reward - group mean) minus ``--kl-coef`` x KL per token,
    whitened over the batch's masked tokens (no group baseline with ``--disable-rewards-normalization``)."""

    def advantages(self, args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
        rewards, masks = batch.rewards.float(), batch.loss_masks
        kl = _reward_shaping_kl(args, batch)
        if args.disable_rewards_normalization:
            return masked_whiten(_broadcast_minus_kl(rewards, kl, args.kl_coef), masks)
        sizes = group_sizes(batch, args.n_samples_per_prompt)
        return reinforce_plus_plus_baseline_advantages(rewards, sizes, kl, masks, args.kl_coef)


def compute_advantages(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """Per-token float32 advantages ``[response_length]`` per sample from ``--advantage-estimator``."""
    return drivers.get_estimator(args.advantage_estimator).advantages(args, batch)


@hookimpl
def advantage(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """The installed estimator ``--advantage-estimator`` names (see `compute_advantages`)."""
    return compute_advantages(args, batch)
