"""The loss of one training micro-batch, by ``--loss-type``: the policy loss (PPO/GRPO/GSPO/CISPO with
the ``loss_correction`` hooks, an optional custom pg-loss reducer, the entropy bonus and KL loss), the
SFT loss (negative log-likelihood of the response tokens), or a ``--custom-loss-function-path`` loss.

Every loss is scaled so that summing it over the micro-batches of an optimizer step gives the step-level
mean (``denom``: the step's sample count, or its token count with ``--calculate-per-token-loss``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from miles_core.custom import load_function
from miles_core.train.losses import LossTerms, aggregate, compute_approx_kl, policy_loss
from miles_core.types import TrainBatch, UsageError


class Objective:
    """The run's loss: built once by the trainer, called per micro-batch."""

    def __init__(self, args: argparse.Namespace, pm: Any, estimator: Any) -> None:
        self.args, self.pm, self.estimator = args, pm, estimator
        self.custom_loss: Callable | None = None
        self.reducer_factory: Callable | None = None
        if args.loss_type == "custom_loss":
            self.custom_loss = load_function(
                args.custom_loss_function_path, "loss_function", flag="--custom-loss-function-path"
            )
        if args.custom_pg_loss_reducer_function_path:
            self.reducer_factory = load_function(
                args.custom_pg_loss_reducer_function_path,
                "get_pg_loss_reducer",
                flag="--custom-pg-loss-reducer-function-path",
            )

    @property
    def needs_entropy(self) -> bool:
        """The policy loss logs the entropy; SFT and custom losses do not use it."""
        return self.args.loss_type == "policy_loss"

    def __call__(
        self, batch: TrainBatch, mb: Any, logp: torch.Tensor, ent: torch.Tensor | None, denom: float,
        logits: Callable[[], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:  # fmt: skip
        """``(loss, metrics, hook_metrics)`` of micro-batch ``mb`` with response log-probs ``logp [N]`` and
        entropies ``ent [N]``; ``logits()`` gives the response-position logits ``[N, V]`` (custom loss).
        ``metrics`` are already step-scaled; ``hook_metrics`` are micro-batch means (the trainer weights
        them by the micro-batch's share of the step)."""
        if self.args.loss_type == "sft_loss":
            loss = -self._agg(logp, mb.loss_mask, mb, denom)
            return loss, {"loss": loss.detach()}, {}
        if self.args.loss_type == "custom_loss":
            return self._custom(batch, mb, logp, denom, logits)
        return self._policy(batch, mb, logp, ent, denom)

    def _agg(self, x: torch.Tensor, mask: torch.Tensor, mb: Any, denom: float) -> torch.Tensor:
        return aggregate(x, mask, mb.lengths_t, self.args.calculate_per_token_loss, denom, mb.loss_mask)

    def _policy(self, batch: TrainBatch, mb: Any, logp, ent, denom: float):
        args = self.args
        if args.use_rollout_logprobs and mb.rollout_log_probs is None:
            raise UsageError(
                "--use-rollout-logprobs needs the rollout's log-probs, but the samples carry none; make the "
                "generate function record rollout_log_probs or drop the flag."
            )
        old = mb.rollout_log_probs if args.use_rollout_logprobs else mb.old_log_probs
        log_ratio = self.estimator.policy_log_ratio(logp, old, mb.loss_mask, mb.lengths_t)
        loss_fn = getattr(self.estimator, "policy_loss", None) or policy_loss
        pg, clipfrac, ppo_kl = loss_fn(
            logp, old, mb.advantages, eps_clip=args.eps_clip, eps_clip_high=args.eps_clip_high,
            eps_clip_c=args.eps_clip_c, log_ratio=log_ratio,
        )  # fmt: skip
        terms = LossTerms(
            log_probs=logp,
            old_log_probs=old,
            advantages=mb.advantages,
            loss_mask=mb.loss_mask.clone(),
            pg_loss=pg,
            lengths=mb.lengths,
            rollout_log_probs=mb.rollout_log_probs,
            train_log_probs=mb.old_log_probs,
            total_lengths=[int(batch.tokens[i].shape[0]) for i in mb.index],
        )
        extra: dict[str, Any] = {}
        for m in self.pm.hook.loss_correction(args=args, terms=terms):
            extra.update(m or {})

        def agg(x: torch.Tensor) -> torch.Tensor:
            return self._agg(x, terms.loss_mask, mb, denom)

        if self.reducer_factory is not None:
            reduce = self.reducer_factory(
                terms.total_lengths, list(mb.lengths), list(terms.loss_mask.split(mb.lengths)),
                args.calculate_per_token_loss,
            )  # fmt: skip
            pg_loss = reduce(terms.pg_loss) / denom
        else:
            pg_loss = agg(terms.pg_loss)
        loss = pg_loss
        metrics: dict[str, Any] = {  # device scalars; the trainer reads them all with one sync
            "pg_loss": pg_loss.detach(),
            "pg_clipfrac": agg(clipfrac).detach(),
            "ppo_kl": agg(ppo_kl).detach(),
            "entropy": agg(ent.detach()),
        }
        if args.entropy_coef:
            loss = loss - args.entropy_coef * agg(ent)
        kl_loss = torch.zeros((), device=pg_loss.device)
        if args.use_kl_loss:
            ratio = torch.exp(logp - old.float()) if args.use_unbiased_kl else None
            kl = compute_approx_kl(logp, mb.ref_log_probs, args.kl_loss_type, importance_ratio=ratio)
            kl_loss = agg(kl)
            loss = loss + args.kl_loss_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
        return loss, metrics, extra

    def _custom(self, batch: TrainBatch, mb: Any, logp, denom: float, logits: Callable[[], torch.Tensor]):
        """``--custom-loss-function-path``: slime's ``(args, batch, logits, sum_of_sample_mean)`` with
        the micro-batch as a dict of slime's keys (``protocols.CustomLossFn``)."""
        lens = list(mb.lengths)

        def split(x: torch.Tensor | None) -> list[torch.Tensor] | None:
            return None if x is None else list(x.split(lens))

        data = {
            "unconcat_tokens": [batch.tokens[i] for i in mb.index],
            "total_lengths": [int(batch.tokens[i].shape[0]) for i in mb.index],
            "response_lengths": lens,
            "loss_masks": split(mb.loss_mask),
            "targets": mb.targets,
            "log_probs": split(mb.old_log_probs),
            "ref_log_probs": split(mb.ref_log_probs),
            "rollout_log_probs": split(mb.rollout_log_probs),
            "advantages": split(mb.advantages),
            "rewards": [float(batch.rewards[i]) for i in mb.index],
            "samples": [batch.samples[i] for i in mb.index],
        }
        out = self.custom_loss(self.args, data, logits(), lambda x: self._agg(x, mb.loss_mask, mb, denom))
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            raise UsageError(
                f"--custom-loss-function-path {self.args.custom_loss_function_path} must return "
                "(loss tensor, metrics dict); fix its return value."
            )
        loss, metrics = out
        return loss, {k: torch.as_tensor(v).detach().float() for k, v in (metrics or {}).items()}, {}
