"""miles-r3 hook implementations: the ``r3`` flags, route capture in rollout, replay before each training
forward, and the ``routing_mismatch_frac`` / route-memory metrics.

Only hookimpls live here; the work is done by `miles_r3.replay.RouteReplay` (imported lazily, so an idle
plugin costs nothing). An active run registers its own `R3Run`, which holds the run's state.
"""

from __future__ import annotations

import argparse
from typing import Any

from miles_core import RolloutOptions, Sample, TrainBatch, hookimpl


@hookimpl
def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "r3", "Rollout routing replay for MoE models (miles-r3): train on the experts the rollout chose."
    )
    group.add_argument(
        "--use-rollout-routing-replay",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Record each token's experts in the rollout engine and replay them in every training-side "
        "forward (ref, old, train); gate weights are recomputed from the training router. "
        "Implies --use-routing-replay.",
    )
    group.add_argument(
        "--use-routing-replay",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Record the experts of the old-log-prob forward and replay them in the training forwards, so "
        "the policy ratio compares the same experts across optimizer steps.",
    )
    group.add_argument(
        "--record-routing-mismatch",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Capture rollout routes only to log routing_mismatch_frac, without replaying them "
        "(implied by either replay flag).",
    )


@hookimpl
def configure(args: argparse.Namespace, pm: Any) -> bool:
    if args.use_rollout_routing_replay:
        # As in miles: rollout replay is routing replay that takes its routes from the engine.
        args.use_routing_replay = True
    active = args.use_routing_replay or args.record_routing_mismatch
    if active:
        pm.register(R3Run(args), name="r3.run")
    return active


class R3Run:
    """The hooks of one run with R3 on: route capture in rollout, replay before the training forwards."""

    def __init__(self, args: argparse.Namespace) -> None:
        from miles_r3.replay import RouteReplay, replay_mode

        self.mode = replay_mode(args)
        self.replay = RouteReplay()

    @hookimpl
    def pre_rollout(self, engine: Any) -> RolloutOptions:
        self.replay.prepare_engine(engine)
        return RolloutOptions(capture_routes=True)

    @hookimpl
    def on_route_record(self, sample: Sample, routed_experts: Any) -> None:
        self.replay.store(sample, routed_experts)

    @hookimpl
    def rollout_metrics(self, samples: list[Sample]) -> dict:
        return self.replay.rollout_metrics(samples)

    @hookimpl
    def pre_forward(self, model: Any, batch: TrainBatch, stage: str) -> None:
        self.replay.before_forward(self.mode, model, batch, stage)

    @hookimpl
    def post_step(self, metrics: dict) -> None:
        metrics.update(self.replay.step_metrics())
