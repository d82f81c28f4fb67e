"""DAPO's dynamic sampling: over-sample prompts, keep the groups a filter passes, refill until
``--rollout-batch-size`` groups pass.

A rollout draws ``--over-sampling-batch-size`` prompts at a time (default ``--rollout-batch-size``),
generates and rewards their groups (the ``post_reward`` hooks run on each round, so a reward-shaping
plugin such as the overlong penalty acts before the filter), and asks ``--dynamic-sampling-filter-path``
about each group; rounds go on until enough groups passed. The first ``--rollout-batch-size`` passing
groups train, in the order they were drawn; the rest of the last round is dropped (slime drops its
surplus too). Every round is generated whole with the rollout's context, so with ``--async
--partial-rollout`` a request that a weight update interrupts continues from its partial response as in
any rollout, and the checkpointed data position is the one before the rollout's first draw (a resumed run
redraws the same prompts). A rollout that has drawn a whole epoch of prompts without filling its batch
trains on the groups that passed (with a warning), or stops the run when none did.

Filters follow slime's signature, ``filter(args, samples, **kwargs) -> DynamicFilterOutput | bool``;
``--dynamic-sampling-filter-path`` takes a ``miles.filters`` name (built-in: ``check_reward_nonzero_std``),
slime's or miles' module path of that filter
(``slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std``), or any custom spec
(``file.py:func``, ``pkg.mod:func``, ``pkg.mod.func``).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from miles_core import drivers
from miles_core.custom import load_function
from miles_core.logging import get_logger
from miles_core.types import EXCLUDED, Sample, UsageError

log = get_logger(__name__)

# slime's and miles' module of the built-in filters: their paths name the same functions here.
FILTER_MODULES = (
    "slime.rollout.filter_hub.dynamic_sampling_filters.",
    "miles.rollout.filter_hub.dynamic_sampling_filters.",
)


@dataclass
class DynamicFilterOutput:
    """A filter's verdict on one group: keep it or not, and why not (counted in the metrics)."""

    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(
    args: argparse.Namespace, samples: list[Sample], **kwargs: Any
) -> DynamicFilterOutput:
    """Keep a group whose rewards differ (standard deviation above 1e-6 over its scored samples): a group
    of equal rewards has zero GRPO advantage everywhere and trains nothing."""
    rewards = [
        s.get_reward_value(args.reward_key) if s.reward is not None else 0.0
        for s in samples
        if s.status not in EXCLUDED
    ]
    keep = len(rewards) > 1 and bool(torch.tensor(rewards, dtype=torch.float64).std() > 1e-6)
    reason = None if keep else (f"zero_std_{round(rewards[0], 1)}" if rewards else "no_scored_samples")
    return DynamicFilterOutput(keep=keep, reason=reason)


def load_filter(spec: str) -> Callable:
    """The filter ``--dynamic-sampling-filter-path`` names (see the module docstring)."""
    for prefix in FILTER_MODULES:
        if spec.startswith(prefix):
            spec = spec[len(prefix) :]
    if any(c in spec for c in "/.:"):
        return load_function(spec, "filter", flag=drivers.FLAGS[drivers.FILTERS])
    return load_function(spec, "filter", group=drivers.FILTERS, flag=drivers.FLAGS[drivers.FILTERS])


def _verdict(output: Any) -> tuple[bool, str | None]:
    if isinstance(output, bool):
        return output, None
    if hasattr(output, "keep"):
        return bool(output.keep), getattr(output, "reason", None)
    raise UsageError(
        f"the --dynamic-sampling-filter-path function returned a {type(output).__name__}; make it return "
        "a bool or an object with .keep (and .reason)."
    )


class DynamicSampler:
    """Runs the rounds of one rollout for the `RolloutManager` (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, filter_fn: Callable | None) -> None:
        self.args, self.filter_fn = args, filter_fn
        self.per_round = args.over_sampling_batch_size or args.rollout_batch_size

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DynamicSampler | None:
        """A sampler when ``--dynamic-sampling-filter-path`` or ``--over-sampling-batch-size`` is set."""
        if args.dynamic_sampling_filter_path is None and args.over_sampling_batch_size is None:
            return None
        spec = args.dynamic_sampling_filter_path
        return cls(args, load_filter(spec) if spec else None)

    def judge(self, group: list[Sample]) -> tuple[bool, str | None]:
        if self.filter_fn is None:
            return True, None
        return _verdict(self.filter_fn(self.args, group))

    async def run(
        self, manager: Any, rollout_id: int, ctx: Any, params: dict, epoch_size: int
    ) -> tuple[list[list[Sample]], dict[str, float]]:
        """The passing groups of rollout ``rollout_id`` (renumbered group-major) and the sampler's metrics.

        :param manager: the `RolloutManager` (its ``_draw``, ``_make_samples``, ``_run``, ``pm``).
        :param epoch_size: prompts in an epoch of the data; drawing that many without filling the batch
            ends the rounds.
        """
        args = self.args
        target = args.rollout_batch_size
        kept: list[list[Sample]] = []
        reasons: Counter = Counter()
        generated = filtered = surplus = rounds = drawn = 0
        rewards_all: list[float] = []
        while len(kept) < target:
            if drawn >= max(epoch_size, target):
                if not kept:
                    raise UsageError(
                        f"dynamic sampling: rollout {rollout_id} drew {drawn} prompts and the filter "
                        f"{args.dynamic_sampling_filter_path} passed none of their groups; check the filter "
                        "or the reward (e.g. every group all correct or all wrong)."
                    )
                log.warning(
                    "dynamic sampling: rollout %d drew %d prompts (an epoch) and only %d of %d groups "
                    "passed the filter; training on those.", rollout_id, drawn, len(kept), target,
                )  # fmt: skip
                break
            prompts = manager._draw(rollout_id, self.per_round, first=rounds == 0)
            drawn += len(prompts)
            rounds += 1
            groups = await manager._run(
                manager._make_samples(prompts, args.n_samples_per_prompt),
                params,
                f"rollout {rollout_id} round {rounds}",
                args.reward_key,
                ctx,
            )
            manager.pm.hook.post_reward(args=args, samples=[s for g in groups for s in g])
            for group in groups:
                generated += 1
                rewards_all += [
                    s.get_reward_value(args.reward_key) for s in group if s.status not in EXCLUDED
                ]
                keep, reason = self.judge(group)
                if not keep:
                    filtered += 1
                    reasons[reason or "filtered"] += 1
                elif len(kept) < target:
                    kept.append(group)
                else:
                    surplus += 1
        index = 0
        for g, group in enumerate(kept):
            for s in group:
                s.group_index, s.index, index = g, index, index + 1
        prefix = "rollout/dynamic_sampling"
        metrics = {
            f"{prefix}/filtered_frac": filtered / max(generated, 1),
            f"{prefix}/groups_generated": float(generated),
            f"{prefix}/groups_filtered": float(filtered),
            f"{prefix}/groups_surplus": float(surplus),
            f"{prefix}/rounds": float(rounds),
            f"{prefix}/reward_mean_all": sum(rewards_all) / max(len(rewards_all), 1),
        }
        metrics.update({f"{prefix}/drop_{r}": float(n) for r, n in reasons.items()})
        return kept, metrics
