"""Put a scaled-out run together: Ray, the placement group, the trainer ranks and the engines.

`build_scaled_out` is what `loop.build_run` calls when the flags ask for more than one process (or
``--use-ray``). It returns the rollout backend (an ``HttpEngine`` over engine actors, or over running
engines given by address) and the train backend (`group.TrainGroup`); closing the train backend stops
the ranks, removes the placement group and stops Ray if this run started it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from miles_core.distributed.group import RankUpdater, TrainGroup
from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)


def _threads(processes: int) -> int:
    """Torch threads per process on CPU: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // max(1, processes))


def start_ranks(args: argparse.Namespace, placement: Any, layout: Any, weights: str) -> TrainGroup:
    """Create the trainer rank actors on their bundles, join them in one process group (rank 0's node
    hosts its store) and build each rank's shard from ``weights``."""
    import ray

    from miles_core.distributed.rank import TrainRank

    processes = layout.num_processes
    actor = ray.remote(TrainRank)
    ranks = [
        actor.options(**placement.trainer_options(i)).remote(
            args, i, layout.trainer_ranks, _threads(processes)
        )
        for i in range(layout.trainer_ranks)
    ]
    group = TrainGroup(args, ranks, colocated=layout.colocate)
    master = group.call("address", ranks=[0])[0]
    group.call("setup", master, weights)
    return group


def build_scaled_out(args: argparse.Namespace, weights: str) -> tuple[Any, TrainGroup]:
    """The engines and trainer ranks the layout flags ask for (see ``miles train --help``, cluster)."""
    from miles_core.distributed.engines import RayEngineFleet
    from miles_core.distributed.placement import Layout, create_placement_group, start_ray, stop_ray
    from miles_core.serve.client import HttpEngine
    from miles_core.serve.pool import normalize_url

    layout = Layout.from_args(args)
    if args.colocate and (args.rollout_engine_urls or args.sglang_router_ip):
        raise UsageError(
            "--colocate starts the engines on the trainer's devices; drop --rollout-engine-urls / "
            "--sglang-router-ip, or drop --colocate."
        )
    # Logical CPUs: one per bundle at least (on a small machine, processes share the cores).
    started = start_ray(args.ray_address, num_cpus=max(os.cpu_count() or 1, layout.num_bundles + 1))
    placement = None
    group = None
    try:
        placement = create_placement_group(layout, fixed_size=started and not args.ray_address)
        log.info("layout:\n%s", layout.describe())
        group = start_ranks(args, placement, layout, weights)
        group.on_close(placement, started)
        mode = args.update_weights_mode or "distributed"  # disaggregated; colocated hands over in place
        updater = RankUpdater(
            group,
            mode=mode,
            start_weights=weights,
            folder=Path(args.run_dir) / "rollout_weights",
        )
        if args.rollout_engine_urls or args.sglang_router_ip:
            engine = HttpEngine.from_args(args, None, None)  # running engines; the ranks update them
            engine.updater = updater
        else:
            fleet = RayEngineFleet(args, layout, placement, weights)
            engine = HttpEngine(args, fleet.start(), weights=weights, fleet=fleet, updater=updater)
            if layout.colocate:
                # Engine j sits on the first of its bundles, which is trainer rank j's device.
                updater.host_rank = lambda url: layout.engine_bundles(
                    [normalize_url(u) if u else None for u in fleet.urls].index(normalize_url(url))
                )[0]
        group.attach(engine)
        if layout.colocate:  # the engines generate first: the ranks make room
            group.call("offload")
        return engine, group
    except BaseException:
        if group is not None:
            group.close()
        else:
            if placement is not None:
                placement.remove()
            if started:
                stop_ray()
        raise
