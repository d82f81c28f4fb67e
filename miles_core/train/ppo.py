"""PPO with a value model (``--advantage-estimator ppo``): per-token rewards, GAE, the clipped value loss.

The estimator reads the critic's values (``TrainBatch.values``, filled by the trainer's `Critic` before
the ``advantage`` hook runs) and turns rewards into advantages with generalised advantage estimation;
the critic regresses onto the matching returns. Formulas follow slime (`get_advantages_and_returns` in
`slime/utils/ppo_utils.py`, `value_loss_function` in `megatron_utils/loss.py`): the sample's reward is
added at its last trainable token to ``-kl_coef * kl`` per token, the value after the last response
token is 0, and the value loss is ``max((clip(V) - R)^2, (V - R)^2)`` without a 1/2 factor.
"""

from __future__ import annotations

import argparse

import torch

from miles_core.train.advantages import GRPO, _reward_shaping_kl, masked_whiten
from miles_core.types import TrainBatch


def ppo_token_rewards(
    rewards: torch.Tensor, kl: list[torch.Tensor], loss_masks: list[torch.Tensor], kl_coef: float
) -> list[torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on trainable tokens, plus the sample's reward at its last
    trainable token (a sample with none gets no reward: it trains nothing)."""
    out = []
    for reward, k, m in zip(rewards.float(), kl, loss_masks, strict=True):
        r = -kl_coef * k.float() * m.float()
        live = m.nonzero()
        if live.numel():
            r[live[-1, 0]] += reward.to(r.device)
        out.append(r)
    return out


def gae(
    token_rewards: list[torch.Tensor], values: list[torch.Tensor], gamma: float, lambd: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Generalised advantage estimation per sample: ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V`` past
    the last token is 0), ``A_t = delta_t + gamma lambd A_{t+1}``; returns ``(advantages, A + V)``.

    Samples are right-padded to ``[B, T]`` and walked back one position at a time (zeros past a sample's
    end keep its advantages 0 there)."""
    if not token_rewards:
        return [], []
    lengths = [r.numel() for r in token_rewards]
    r = torch.nn.utils.rnn.pad_sequence([x.float() for x in token_rewards], batch_first=True)
    v = torch.nn.utils.rnn.pad_sequence([x.float() for x in values], batch_first=True)
    adv = torch.zeros_like(r)
    running = r.new_zeros(r.shape[0])
    for t in range(r.shape[1] - 1, -1, -1):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(running)
        running = r[:, t] + gamma * next_v - v[:, t] + gamma * lambd * running
        adv[:, t] = running
    ret = adv + v
    return (
        [row[:n] for row, n in zip(adv, lengths, strict=True)],
        [row[:n] for row, n in zip(ret, lengths, strict=True)],
    )


def advantages_and_returns(
    args: argparse.Namespace, batch: TrainBatch
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """GAE advantages (not whitened) and returns of ``batch`` from its rewards, the KL shaping of
    ``--kl-coef`` and the critic's ``batch.values``, with ``--gamma`` and ``--lambd``."""
    if batch.values is None:
        raise RuntimeError("--advantage-estimator ppo needs the critic's values; the torch trainer sets them")
    kl = _reward_shaping_kl(args, batch)
    token_rewards = ppo_token_rewards(batch.rewards, kl, batch.loss_masks, args.kl_coef)
    return gae(token_rewards, batch.values, args.gamma, args.lambd)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss ``max((V_clip - R)^2, (V - R)^2)`` with ``V_clip = V_old +
    clamp(V - V_old, -value_clip, value_clip)``, and the clip indicator ``|V - V_old| > value_clip``."""
    delta = values - old_values
    clipped = old_values + delta.clamp(-value_clip, value_clip)
    loss = torch.maximum((clipped - returns).square(), (values - returns).square())
    return loss, (delta.abs() > value_clip).float()


class PPO(GRPO):
    """``ppo``: GAE advantages from the critic's values (whitened over the batch with
    ``--normalize-advantages``); the token-level PPO ratio. The trainer builds the critic because
    ``needs_critic`` is set."""

    group_relative = False
    needs_critic = True

    def advantages(self, args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
        advs, _ = advantages_and_returns(args, batch)
        return masked_whiten(advs, batch.loss_masks) if args.normalize_advantages else advs
