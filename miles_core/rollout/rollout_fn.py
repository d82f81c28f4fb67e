"""``--rollout-function-path``: slime's custom rollout function, and the data source it is given.

A rollout function replaces the whole training rollout: ``generate_rollout(args, rollout_id, data_source,
evaluation=False)`` returns the rollout's groups (``list[list[Sample]]``, or an object with ``samples`` and
optionally ``metrics``, like slime's ``RolloutFnTrainOutput``). It may be sync (it runs on a worker thread)
or ``async`` (awaited on the rollout's event loop). What it returns goes through the same checks as a generate
function's samples, samples without a reward are scored by the configured reward, ``post_reward`` runs,
and the trainer groups samples by ``group_index`` (each returned group gets its own) for the advantages.
`generate_rollout` below is the built-in rollout in that form: wrap it to add to it.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
from typing import Any

from miles_core.rollout.checks import blank_response, sample_problem, short
from miles_core.types import EXCLUDED, Sample, UsageError


class RolloutDataSource:
    """What a rollout function gets as ``data_source``: prompts, the built-in generation, the event loop."""

    def __init__(self, manager: Any, rollout_id: int, ctx: Any, params: dict) -> None:
        self.manager, self.rollout_id, self.ctx, self.params = manager, rollout_id, ctx, params
        self.loop = asyncio.get_running_loop()
        self._first = True
        self._buffer: list[list[Sample]] = []

    def get_samples(self, num_samples: int) -> list[list[Sample]]:
        """``num_samples`` prompts as groups of ``--n-samples-per-prompt`` pending samples (slime's
        ``data_source.get_samples``); groups given back with `add_samples` come first."""
        out, self._buffer = self._buffer[:num_samples], self._buffer[num_samples:]
        if len(out) < num_samples:
            prompts = self.manager._draw(self.rollout_id, num_samples - len(out), first=self._first)
            self._first = False
            out += self.manager._make_samples(prompts, self.manager.args.n_samples_per_prompt)
        return out

    def add_samples(self, groups: list[list[Sample]]) -> None:
        """Give groups back (e.g. unfinished ones); the next `get_samples` of this rollout returns them
        first. They are not kept past the rollout or in checkpoints."""
        self._buffer = list(groups) + self._buffer

    async def generate(self, groups: list[list[Sample]], params: dict | None = None) -> list[list[Sample]]:
        """Run the configured generate function and reward on ``groups`` (the built-in rollout's work);
        ``params`` overrides sampling parameters (``temperature``, ``max_new_tokens``, ...)."""
        params = dict(self.params, **(params or {}))
        key = self.manager.args.reward_key
        return await self.manager._run(groups, params, f"rollout {self.rollout_id}", key, self.ctx)

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on the rollout's event loop from a sync rollout function; returns its result."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            raise RuntimeError(
                "data_source.run() blocks; an async rollout function awaits the coroutine instead."
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def generate_rollout(
    args: argparse.Namespace, rollout_id: int, data_source: RolloutDataSource, evaluation: bool = False
) -> list[list[Sample]]:
    """The built-in rollout: ``--rollout-batch-size`` prompts, each group generated and rewarded."""
    if evaluation:
        raise UsageError(
            "miles runs eval sets with the built-in rollout; call generate_rollout for training."
        )
    return data_source.run(data_source.generate(data_source.get_samples(args.rollout_batch_size)))


async def call_rollout_fn(
    fn: Any, source: str, data_source: RolloutDataSource
) -> tuple[list[list[Sample]], dict]:
    """Call ``fn`` (sync on a worker thread, async on this loop); returns its groups and metrics."""
    manager = data_source.manager
    args = manager.args
    call = (args, data_source.rollout_id, data_source)
    result = await fn(*call, evaluation=False) if inspect.iscoroutinefunction(fn) else (
        await asyncio.to_thread(fn, *call, evaluation=False)
    )  # fmt: skip
    metrics = dict(getattr(result, "metrics", None) or {})
    groups = getattr(result, "samples", result)
    if not isinstance(groups, (list, tuple)) or not groups:
        raise UsageError(
            f"{source} returned {short(result)}, not a non-empty list of groups (lists of Samples); "
            "return list[list[Sample]]."
        )
    out = []
    for g, group in enumerate(groups):
        group = [group] if isinstance(group, Sample) else group
        if not isinstance(group, (list, tuple)) or not group or not all(isinstance(s, Sample) for s in group):
            raise UsageError(
                f"{source} returned group {g} as {short(group)}, not a non-empty list of Samples; "
                "return list[list[Sample]]."
            )
        out.append(list(group))
    return out, {k: float(v) for k, v in metrics.items()}


async def finish_groups(manager: Any, groups: list[list[Sample]], source: str) -> None:
    """Number the groups, fail samples the trainer cannot use, reward those still without a reward."""
    pending: list[Sample] = []
    for g, group in enumerate(groups):
        for s in group:
            s.group_index = g
            if len(s.response_weight_versions) != s.response_length:
                s.response_weight_versions = [manager.engine.weight_version] * s.response_length
            problem = sample_problem(s)
            if problem is not None:
                blank_response(s, list(s.tokens[: max(0, s.prompt_length)]) or [0])
                manager.failures.record([s], "generate", source, problem)
            elif s.reward is None and s.status not in EXCLUDED:
                pending.append(s)
    if manager.args.group_rm:
        ids = {id(s) for s in pending}
        for group in groups:
            todo = [s for s in group if id(s) in ids]
            if todo:
                await manager.rewards.score_group(todo, manager.args.reward_key)
    else:
        await asyncio.gather(*(manager.rewards.score(s, manager.args.reward_key) for s in pending))
    for i, s in enumerate(s for g in groups for s in g):
        s.index = i
