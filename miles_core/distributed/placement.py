"""Where the processes of a scaled-out run go: Ray started on 127.0.0.1 (or an existing cluster joined),
the `Layout` that slime's cluster flags describe, and the one placement group that reserves a bundle per
device for it (a GPU, or on CPU one CPU per process).

Ray is an optional dependency (``pip install 'miles-core[ray]'``): it is imported by the functions that
need it, so this module and `Layout` work without it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)

RAY_EXTRA = "pip install 'miles-core[ray]'"
LOOPBACK = "127.0.0.1"
# Ray binds to the machine's address unless told it is not a cluster (its switch for laptops).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Shares of one device (a bundle) for a colocated trainer rank and rollout engine, as slime gives them:
# both fit on the bundle, with room left for a helper actor.
TRAINER_SHARE = 0.4
ENGINE_SHARE = 0.2
PLACEMENT_TIMEOUT_S = 60.0
_LAYOUT_FLAGS = "--actor-num-nodes x --actor-num-gpus-per-node"


def import_ray() -> Any:
    """The ``ray`` module, or the one-sentence `UsageError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            f"this layout runs its processes as Ray actors, and Ray is not installed; {RAY_EXTRA}."
        ) from None
    return ray


# ---------------------------------------------------------------- the Ray cluster


def _source_paths() -> list[str]:
    """This process's import path outside the interpreter's own directories (a source tree, a test's
    plugins): Ray's workers get it first on theirs, so they import the same miles as the driver."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out = []
    for p in sys.path:
        path = os.path.realpath(p or os.getcwd())
        if os.path.isdir(path) and not any(path.startswith(pre + os.sep) for pre in prefixes):
            out.append(path)
    return list(dict.fromkeys(out))


def _worker_pythonpath() -> str:
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([*_source_paths(), *inherited]))


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored after (the processes started meanwhile keep them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray: a new local cluster bound to 127.0.0.1 only (no dashboard), or the
    cluster at ``address`` (``--ray-address``). Ray's workers import the same miles as this process.

    :param address: an existing cluster (``ray://...``, ``HOST:PORT`` or ``auto``); None starts one here.
    :param num_cpus: CPUs the new local cluster offers (default: this machine's); ignored with ``address``.
    :returns: whether this call connected, so the caller calls `stop_ray` exactly when it did (False when
        Ray was already initialised).
    :raises UsageError: Ray is not installed.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is not None:
        env = {"PYTHONPATH": _worker_pythonpath()}
        env.update({k: v for k, v in os.environ.items() if k.startswith("MILES_")})
        ray.init(address=address, runtime_env={"env_vars": env})
        log.info("joined the Ray cluster at %s: %s", address, _resources_text(ray.cluster_resources()))
        return True
    from ray._private import ray_constants

    # Ray reads the switch when it is imported, which may have happened before this call: set both. The
    # local raylet inherits this environment (the switch and the import path) and its workers the raylet's.
    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environ(**{_LOCAL_ONLY_ENV: "0", "PYTHONPATH": _worker_pythonpath()}):
            ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, num_cpus=num_cpus)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
    ips = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if ips != {LOOPBACK}:
        ray.shutdown()
        raise RuntimeError(f"the local Ray cluster listens on {sorted(ips)}, not only on {LOOPBACK}.")
    log.info("started a local Ray cluster on %s: %s", LOOPBACK, _resources_text(ray.cluster_resources()))
    return True


def stop_ray() -> None:
    """Disconnect from Ray; a local cluster that `start_ray` started stops with it."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


# ---------------------------------------------------------------- the layout


def _span(first: int, count: int) -> str:
    return str(first) if count == 1 else f"{first}-{first + count - 1}"


@dataclass(frozen=True)
class Layout:
    """The processes of a run and the devices they use, from slime's cluster flags.

    On CPU the same flags count processes: a "GPU" there is one CPU slot of the placement group.
    """

    device: str  # "cpu" or "cuda"
    nodes: int  # --actor-num-nodes
    gpus_per_node: int  # --actor-num-gpus-per-node
    num_engines: int
    gpus_per_engine: int  # --rollout-num-gpus-per-engine
    colocate: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Layout:
        """The layout of ``--actor-num-nodes``, ``--actor-num-gpus-per-node``, ``--rollout-num-gpus``,
        ``--rollout-num-gpus-per-engine``, ``--rollout-num-engines``, ``--colocate`` and ``--device``.

        :raises UsageError: flags that disagree, in one sentence naming the flag and the fix.
        """
        for flag, value in (
            ("--actor-num-nodes", args.actor_num_nodes),
            ("--actor-num-gpus-per-node", args.actor_num_gpus_per_node),
            ("--rollout-num-gpus-per-engine", args.rollout_num_gpus_per_engine),
            ("--rollout-num-engines", args.rollout_num_engines),
        ):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}.")
        ranks = args.actor_num_nodes * args.actor_num_gpus_per_node
        per_engine = args.rollout_num_gpus_per_engine
        gpus = args.rollout_num_gpus
        nodes, per_node = args.actor_num_nodes, args.actor_num_gpus_per_node
        trainer = f"the trainer's {ranks} GPUs "
        trainer += f"(--actor-num-nodes {nodes} x --actor-num-gpus-per-node {per_node})"
        if args.colocate:
            if gpus is not None and gpus != ranks:
                raise UsageError(
                    f"--rollout-num-gpus {gpus} differs from {trainer}; with --colocate the engines share "
                    f"the trainer's GPUs, so drop --rollout-num-gpus or set it to {ranks}."
                )
            if ranks % per_engine:
                raise UsageError(
                    f"--rollout-num-gpus-per-engine {per_engine} does not divide {trainer}, which "
                    f"--colocate engines share; use a divisor of {ranks}."
                )
            engines, source = ranks // per_engine, f"{ranks} colocated GPUs"
        elif gpus is not None:
            if gpus < 1:
                raise UsageError(f"--rollout-num-gpus must be at least 1, got {gpus}.")
            if gpus % per_engine:
                raise UsageError(
                    f"--rollout-num-gpus {gpus} is not divisible by --rollout-num-gpus-per-engine "
                    f"{per_engine}; give the engines a multiple of {per_engine} GPUs."
                )
            engines, source = gpus // per_engine, f"--rollout-num-gpus {gpus}"
        else:
            engines = source = None
        if engines is None:
            engines = args.rollout_num_engines
        elif args.rollout_num_engines not in (1, engines):  # 1 is its default: it was not given
            raise UsageError(
                f"--rollout-num-engines {args.rollout_num_engines} disagrees with the {engines} engines of "
                f"{source} / --rollout-num-gpus-per-engine {per_engine}; drop --rollout-num-engines."
            )
        return cls(
            device=_device_kind(args.device),
            nodes=args.actor_num_nodes,
            gpus_per_node=args.actor_num_gpus_per_node,
            num_engines=engines,
            gpus_per_engine=per_engine,
            colocate=bool(args.colocate),
        )

    # ------------------------------------------------------------ counts and bundles

    @property
    def trainer_ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def num_bundles(self) -> int:
        """Devices the placement group reserves: the trainer's, plus the engines' unless colocated."""
        return self.trainer_ranks + (0 if self.colocate else self.num_engines * self.gpus_per_engine)

    @property
    def num_processes(self) -> int:
        return self.trainer_ranks + self.num_engines

    def bundle(self) -> dict[str, float]:
        """The resources of one bundle (every bundle is alike)."""
        return {"GPU": 1, "CPU": 1} if self.device == "cuda" else {"CPU": 1}

    def trainer_bundle(self, rank: int) -> int:
        if not 0 <= rank < self.trainer_ranks:
            raise IndexError(f"trainer rank {rank} is not in 0..{self.trainer_ranks - 1}")
        return rank

    def engine_bundles(self, j: int) -> list[int]:
        """The bundles (devices) of engine ``j``; its actor sits on the first (a `miles serve` engine
        uses one device; the others are reserved for an engine that spans several)."""
        if not 0 <= j < self.num_engines:
            raise IndexError(f"rollout engine {j} is not in 0..{self.num_engines - 1}")
        first = (0 if self.colocate else self.trainer_ranks) + j * self.gpus_per_engine
        return list(range(first, first + self.gpus_per_engine))

    def trainer_resources(self) -> dict[str, float]:
        """``num_cpus``/``num_gpus`` of a trainer-rank actor: the whole bundle, or its share when
        colocated."""
        return self._share(TRAINER_SHARE if self.colocate else 1.0)

    def engine_resources(self) -> dict[str, float]:
        return self._share(ENGINE_SHARE if self.colocate else 1.0)

    def _share(self, share: float) -> dict[str, float]:
        if self.device == "cuda":
            return {"num_gpus": share, "num_cpus": share}
        return {"num_gpus": 0, "num_cpus": share}

    # ------------------------------------------------------------ the picture

    def describe(self) -> str:
        """A few lines saying where each process runs (for logs, ``--help`` and the README)."""
        unit = "GPU" if self.device == "cuda" else "CPU"
        r, e, g = self.trainer_ranks, self.num_engines, self.gpus_per_engine
        comm = "NCCL" if self.device == "cuda" else "gloo"
        mode = "colocated" if self.colocate else "disaggregated"
        lines = [
            f"{_n(r, 'trainer rank')} + {_n(e, 'rollout engine')}, {mode}, on {_n(self.num_bundles, unit)} "
            "in one Ray placement group"
            + (" (on CPU each GPU of the flags is a process with one CPU)" if unit == "CPU" else "")
        ]
        per_node = f"{_n(self.nodes, 'node')} x {_n(self.gpus_per_node, unit)}"
        trainer = f"{_noun(r, 'trainer rank')} {_span(0, r)} ({per_node}, "
        trainer += f"torch.distributed over {comm})"
        engines = f"{_noun(e, 'rollout engine')} {_span(0, e)} ({_n(g, unit)} each, "
        engines += "`miles serve` over HTTP)"
        if self.colocate:
            lines.append(f"  {unit} {_span(0, r):<7} {trainer}, {TRAINER_SHARE:g} of each {unit}")
            lines.append(f"  {unit} {_span(0, r):<7} {engines}, {ENGINE_SHARE:g} of each {unit}")
            lines.append(
                "  they take turns: the engines release weights and KV cache while the trainer trains, "
                "the trainer offloads optimizer state and gradients during rollout"
            )
        else:
            lines.append(f"  {unit} {_span(0, r):<7} {trainer}")
            lines.append(f"  {unit} {_span(r, e * g):<7} {engines}")
        return "\n".join(lines)


def _noun(count: int, noun: str) -> str:
    return noun + "s" * (count != 1)


def _n(count: int, noun: str) -> str:
    """``2 GPUs``, ``1 GPU``."""
    return f"{count} {_noun(count, noun)}"


def _device_kind(device: str | None) -> str:
    """``--device`` as the kind of device a layout places (default: cuda where this machine sees one)."""
    if device is None:
        import torch  # only when the run does not say

        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: a Ray layout places processes on cpu or cuda; use one of them.")
    return kind


# ---------------------------------------------------------------- the placement group


class Placement:
    """The run's placement group (one bundle per device of the `Layout`) and where each actor goes.

    A trainer-rank actor: ``RankActor.options(**placement.trainer_options(rank)).remote(...)``; an engine:
    ``placement.engine_options(j)``. Removed by `remove`, and when this object is collected or at exit
    (which kills the actors in it): keep it referenced for the whole run.
    """

    def __init__(self, layout: Layout, group: Any) -> None:
        self.layout = layout
        self.group = group
        self._finalizer = weakref.finalize(self, _remove_group, group)

    def strategy(self, bundle: int) -> Any:
        """The scheduling strategy that puts an actor on ``bundle`` of the group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=bundle
        )

    def trainer_options(self, rank: int) -> dict[str, Any]:
        """``.options(...)`` of trainer rank ``rank``'s actor: its bundle and its share of it."""
        return {
            **self.layout.trainer_resources(),
            "scheduling_strategy": self.strategy(self.layout.trainer_bundle(rank)),
        }

    def engine_options(self, j: int) -> dict[str, Any]:
        """``.options(...)`` of rollout engine ``j``'s actor (on the first of its bundles)."""
        return {
            **self.layout.engine_resources(),
            "scheduling_strategy": self.strategy(self.layout.engine_bundles(j)[0]),
        }

    def remove(self) -> None:
        """Give the reserved resources back (the actors in the group are killed). Safe to call twice."""
        self._finalizer()

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _remove_group(group: Any) -> None:
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return  # gone with the cluster (or the connection) it was part of
    from ray.util.placement_group import remove_placement_group

    with contextlib.suppress(Exception):
        remove_placement_group(group)


def create_placement_group(
    layout: Layout, timeout: float = PLACEMENT_TIMEOUT_S, fixed_size: bool = False
) -> Placement:
    """Reserve one bundle per device of ``layout`` (packed onto as few nodes as fit) and wait for it.

    :param fixed_size: the cluster cannot grow (the local one a run starts): when its totals are short,
        say so at once instead of waiting ``timeout`` for resources that cannot come.
    :raises UsageError: the cluster could not give the bundles within ``timeout`` seconds; the sentence
        says which resources it lacks.
    """
    ray = import_ray()
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [layout.bundle() for _ in range(layout.num_bundles)]
    total = ray.cluster_resources()
    if fixed_size and any(total.get(k, 0) < sum(b.get(k, 0) for b in bundles) for k in bundles[0]):
        raise UsageError(_lacking(layout, bundles, total, ray.available_resources(), 0))
    group = placement_group(bundles, strategy="PACK")
    start = time.monotonic()
    try:
        ray.get(group.ready(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        lacking = _lacking(layout, bundles, ray.cluster_resources(), ray.available_resources(), timeout)
        raise UsageError(lacking) from None
    log.info("placement group ready in %.1f s:\n%s", time.monotonic() - start, layout.describe())
    return Placement(layout, group)


def _lacking(
    layout: Layout,
    bundles: list[dict[str, float]],
    total: dict[str, float],
    free: dict[str, float],
    timeout: float,
) -> str:
    """The sentence of a placement group that was not ready in time: what the cluster lacks."""
    need = {k: sum(b.get(k, 0) for b in bundles) for k in bundles[0]}
    short = [k for k in need if total.get(k, 0) < need[k]]
    asks = " and ".join(f"{need[k]:g} {k}" for k in need)
    what = f"{_n(layout.trainer_ranks, 'trainer rank')} + {_n(layout.num_engines, 'rollout engine')}"
    what += f"{' colocated' if layout.colocate else ''} need {asks}"
    if short:
        has = " and ".join(f"{total.get(k, 0):g} {k}" for k in short)
        return (
            f"the Ray cluster cannot hold this layout: {what}, and it has {has}; add "
            f"{'GPUs' if 'GPU' in short else 'CPUs'} to the cluster or shrink the layout "
            f"({_LAYOUT_FLAGS}, --rollout-num-gpus, --colocate)."
        )
    busy = " and ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}" for k in need)
    return (
        f"the Ray cluster did not place this layout within {timeout:g} s: {what}, and only {busy} are "
        "free; stop what holds the rest or shrink the layout."
    )


__all__ = [
    "ENGINE_SHARE",
    "TRAINER_SHARE",
    "Layout",
    "Placement",
    "create_placement_group",
    "import_ray",
    "start_ray",
    "stop_ray",
]
