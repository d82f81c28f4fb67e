"""Weights over a standalone process group: the trainer (rank 0) broadcasts, each engine receives.

SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed`` pair. The group is built
directly from a ``TCPStore`` (rank 0 is the store's master) and a Gloo (CPU) or NCCL (CUDA) backend, not
through ``init_process_group``, so it never touches a process's default group (the trainer's own ranks).
Both sides call the blocking functions here from a worker thread; tensors go one by one, in the order of
``names``, which the HTTP request carries with their dtypes and shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class WeightGroup:
    """One side's handle on a weight-update group."""

    name: str
    rank: int
    world_size: int
    backend: str
    store: Any
    pg: Any

    @property
    def device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )


def group_store(store: Any, group_name: str) -> Any:
    """The group's view of a TCPStore (every rank wraps it the same way)."""
    return dist.PrefixStore(f"miles_weights/{group_name}", store)


def join_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
) -> WeightGroup:
    """Join (rank 0: create) the group; blocks until all ``world_size`` ranks have joined."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r} is not one of gloo, nccl.")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address,
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )
    prefixed = group_store(store, group_name)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    else:
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    return WeightGroup(group_name, rank, world_size, backend, store, pg)


def tensor_specs(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The ``names``, ``dtypes`` and ``shapes`` fields of an ``/update_weights_from_distributed`` body."""
    names, dtypes, shapes = [], [], []
    for n, t in named:
        names.append(n)
        dtypes.append(dtype_name(t.dtype))
        shapes.append(list(t.shape))
    return {"names": names, "dtypes": dtypes, "shapes": shapes}


def send(group: WeightGroup, tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0: broadcast each tensor, in order."""
    for t in tensors:
        t = t.detach().to(group.device).contiguous()
        group.pg.broadcast(t, 0).wait()


def receive(group: WeightGroup, dtypes: list[str], shapes: list[list[int]]) -> list[torch.Tensor]:
    """An engine: receive one broadcast per (dtype, shape), in order."""
    out = []
    for d, s in zip(dtypes, shapes):
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r} is not one of {', '.join(DTYPES)}.")
        t = torch.empty([int(x) for x in s], dtype=DTYPES[d], device=group.device)
        group.pg.broadcast(t, 0).wait()
        out.append(t)
    return out
