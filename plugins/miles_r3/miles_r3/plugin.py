"""miles-r3 hook implementations: the ``r3`` flags, route capture in rollout, replay before each training
forward, and the ``routing_mismatch_frac`` / route-memory metrics.

Only hookimpls live here; the work is done by `miles_r3.replay.RouteReplay` (imported lazily, so an idle
plugin costs nothing). Its state is a module-level object reset by `configure`, never on ``args``.
"""

from __future__ import annotations

import argparse
from typing import Any

from miles_core import Sample, TrainBatch, hookimpl

_state: Any = None  # miles_r3.replay.RouteReplay of the current run


def state() -> Any:
    """The run's `RouteReplay` (created on first use, replaced by each `configure`)."""
    global _state
    if _state is None:
        from miles_r3.replay import RouteReplay

        _state = RouteReplay()
    return _state


def _mode(args: argparse.Namespace) -> str | None:
    from miles_r3.replay import replay_mode

    return replay_mode(args)


def _active(args: argparse.Namespace) -> bool:
    return any(
        getattr(args, flag, False)
        for flag in ("use_rollout_routing_replay", "use_routing_replay", "record_routing_mismatch")
    )


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "r3", "Rollout routing replay for MoE models (miles-r3): train on the experts the rollout chose."
    )
    group.add_argument(
        "--use-rollout-routing-replay",
        action="store_true",
        default=False,
        help="Record each token's experts in the rollout engine and replay them in every training-side "
        "forward (ref, old, train); gate weights are recomputed from the training router. "
        "Implies --use-routing-replay.",
    )
    group.add_argument(
        "--use-routing-replay",
        action="store_true",
        default=False,
        help="Record the experts of the old-log-prob forward and replay them in the training forwards, so "
        "the policy ratio compares the same experts across optimizer steps.",
    )
    group.add_argument(
        "--record-routing-mismatch",
        action="store_true",
        default=False,
        help="Capture rollout routes only to log routing_mismatch_frac, without replaying them "
        "(implied by either replay flag).",
    )


@hookimpl
def configure(args: argparse.Namespace) -> bool:
    global _state
    if getattr(args, "use_rollout_routing_replay", False):
        # As in miles: rollout replay is routing replay that takes its routes from the engine.
        args.use_routing_replay = True
    _state = None  # a fresh RouteReplay per run
    return _active(args)


@hookimpl
def pre_rollout(args: argparse.Namespace, rollout_id: int, engine: Any) -> None:
    if _active(args):
        state().prepare_engine(engine)


@hookimpl
def on_route_record(args: argparse.Namespace, sample: Sample, routed_experts: Any) -> None:
    if _active(args):
        state().store(sample, routed_experts)


@hookimpl
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    if not _active(args):
        return None
    from miles_r3.replay import RouteReplay

    return RouteReplay.rollout_metrics(samples)


@hookimpl
def pre_forward(args: argparse.Namespace, model: Any, batch: TrainBatch, stage: str) -> None:
    mode = _mode(args)
    if mode is not None:
        state().before_forward(mode, model, batch, stage)


@hookimpl
def post_step(args: argparse.Namespace, step: int, model: Any, metrics: dict) -> None:
    if _active(args):
        metrics.update(state().step_metrics())
