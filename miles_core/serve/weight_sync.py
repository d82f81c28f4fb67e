"""Weights over a standalone process group: the trainer (rank 0) broadcasts, each engine receives.

SGLang's ``/init_weights_update_group`` + ``/update_weights_from_distributed`` pair. The group is built
directly from a ``TCPStore`` (rank 0 is the store's master) and a Gloo (CPU) or NCCL (CUDA) backend, not
through ``init_process_group``, so it never touches a process's default group (the trainer's own ranks).
Both sides call the blocking functions here from a worker thread; tensors go one by one, in the order of
``names``, which the HTTP request carries with their dtypes and shapes. A miles engine also takes a
bucket packed (``"packed": true`` in the request; its ``/get_server_info`` says ``packed_broadcast``):
the tensors' bytes back to back, each from a multiple of 16 bytes, in one broadcast, which saves a
collective per tensor (a 0.7B MoE has ~1,300 tensors).

`choose_backend` picks the backend: NCCL when the trainer and every engine are CUDA processes, each on a
GPU of its own (two ranks of one NCCL group cannot share a GPU), Gloo otherwise. Nothing here sets an
``NCCL_*`` variable: NCCL reads the process's environment as the user left it (``NCCL_NVLS_ENABLE=0``
keeps NVLink multicast off).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from miles_core.logging import get_logger

log = get_logger(__name__)

ALIGN = 16  # bytes: where each tensor of a packed bucket starts (any dtype can be viewed there)
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


def choose_backend(
    trainer: torch.device | str, engines: Sequence[dict[str, Any]], trainer_gpu: str | None = None
) -> str:
    """``nccl`` when the trainer's tensors are on a CUDA device and every engine says (its
    ``/get_server_info``) that it runs on CUDA, no two of them (nor an engine and the trainer) on one GPU
    by ``gpu_uuid`` where known; ``gloo`` otherwise (a CPU trainer or engine, an engine that does not say
    where it runs, or a shared GPU).

    :param trainer: the device of the tensors the trainer sends.
    :param engines: each engine's ``/get_server_info`` answer: ``device`` (``"cuda"``, ``"cuda:1"``,
        ``"cpu"``) and ``gpu_uuid``.
    :param trainer_gpu: the UUID of the trainer's GPU (`gpu_uuid`), if known.
    """
    if torch.device(trainer).type != "cuda" or not engines:
        return "gloo"
    if not all(str(e.get("device") or "").startswith("cuda") for e in engines):
        return "gloo"
    uuids = [u for u in [trainer_gpu, *(e.get("gpu_uuid") for e in engines)] if u]
    return "nccl" if len(uuids) == len(set(uuids)) else "gloo"


def gpu_uuid(device: torch.device) -> str | None:
    """The UUID of the GPU ``device`` (the same in every process that sees it), or None off CUDA."""
    if device.type != "cuda":
        return None
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)  # absent in some builds
    return None if uuid is None else str(uuid)


@dataclass
class WeightGroup:
    """One side's handle on a weight-update group; ``device``: where its tensors travel from or to (the
    CPU for Gloo, this side's GPU for NCCL)."""

    name: str
    rank: int
    world_size: int
    backend: str
    store: Any
    pg: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    packed: bool = False  # rank 0: every engine takes a bucket as one broadcast (``packed_broadcast``)


def group_device(backend: str, device: torch.device | str | None = None) -> torch.device:
    """Where a group's tensors live: the CPU under Gloo; under NCCL ``device`` (default: the current
    CUDA device)."""
    if backend != "nccl":
        return torch.device("cpu")
    device = torch.device(device) if device is not None else torch.device("cuda")
    if device.type != "cuda":
        raise ValueError(f"an NCCL group moves CUDA tensors, not {device} ones.")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def group_store(store: Any, group_name: str) -> Any:
    """The group's view of a TCPStore (every rank wraps it the same way)."""
    return dist.PrefixStore(f"miles_weights/{group_name}", store)


def make_pg(store: Any, group_name: str, rank: int, world_size: int, backend: str, timeout_s: float) -> Any:
    """The process group over ``store`` (Gloo's constructor blocks until every rank has joined)."""
    prefixed = group_store(store, group_name)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, timedelta(seconds=timeout_s))
    if backend == "nccl":
        return dist.ProcessGroupNCCL(prefixed, rank, world_size)
    raise ValueError(f"backend {backend!r} is not one of gloo, nccl.")


def join_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 300.0,
    device: torch.device | str | None = None,
) -> WeightGroup:
    """Join (rank 0: create) the group; Gloo blocks until all ``world_size`` ranks have joined, NCCL
    connects at the first broadcast. ``device``: this side's GPU under NCCL (see `group_device`)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r} is not one of gloo, nccl.")
    where = group_device(backend, device)
    store = dist.TCPStore(
        master_address,
        int(master_port),
        world_size,
        is_master=rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    pg = make_pg(store, group_name, rank, world_size, backend, timeout_s)
    return WeightGroup(group_name, rank, world_size, backend, store, pg, where)


def abort(group: WeightGroup) -> None:
    """Abort an NCCL group's communicator (local, does not wait for the other ranks); Gloo's needs
    nothing (its operations time out)."""
    if group.backend != "nccl":
        return
    stop = getattr(group.pg, "abort", None)
    try:
        if stop is not None:
            stop()
    except Exception as e:  # the group is dropped either way
        log.warning("aborting weight update group %s failed: %s", group.name, e)


def tensor_specs(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The ``names``, ``dtypes`` and ``shapes`` fields of an ``/update_weights_from_distributed`` body."""
    names, dtypes, shapes = [], [], []
    for n, t in named:
        names.append(n)
        dtypes.append(dtype_name(t.dtype))
        shapes.append(list(t.shape))
    return {"names": names, "dtypes": dtypes, "shapes": shapes}


def packed_layout(dtypes: list[str], shapes: list[list[int]]) -> tuple[list[tuple[int, int]], int]:
    """Where each tensor of a packed bucket lies: its (byte offset, byte count), each offset a multiple
    of `ALIGN`, and the bucket's total bytes."""
    spans, offset = [], 0
    for d, s in zip(dtypes, shapes):
        n = math.prod(int(x) for x in s) * DTYPES[d].itemsize
        spans.append((offset, n))
        offset += -(-n // ALIGN) * ALIGN
    return spans, offset


def _check(dtypes: list[str]) -> None:
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype {d!r} is not one of {', '.join(DTYPES)}.")


def _on_device(group: WeightGroup) -> Any:
    return torch.cuda.device(group.device) if group.device.type == "cuda" else contextlib.nullcontext()


def send(group: WeightGroup, tensors: Iterable[torch.Tensor], packed: bool = False) -> None:
    """Rank 0: broadcast each tensor, in order, or (``packed``) the bucket's bytes as one broadcast
    (`packed_layout`). Under NCCL a tensor already on this side's GPU goes from there; one elsewhere is
    copied there first. The broadcasts are queued on the GPU: the stream that made the tensors waits for
    them."""
    to_gpu = group.device.type == "cuda"  # (a copy to the CPU must be complete before Gloo reads it)
    with _on_device(group):
        if not packed:
            for t in tensors:
                t = t.detach().to(group.device, non_blocking=to_gpu).contiguous()
                group.pg.broadcast(t, 0).wait()
            return
        pieces = []
        for t in tensors:
            raw = t.detach().to(group.device, non_blocking=to_gpu).contiguous().view(-1).view(torch.uint8)
            pieces.append(raw)
            if raw.numel() % ALIGN:
                pad = ALIGN - raw.numel() % ALIGN
                pieces.append(torch.zeros(pad, dtype=torch.uint8, device=group.device))
        raw = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.uint8)
        if raw.numel():  # (as `receive` expects: no broadcast for a bucket of no bytes)
            group.pg.broadcast(raw, 0).wait()


def receive(
    group: WeightGroup, dtypes: list[str], shapes: list[list[int]], packed: bool = False
) -> list[torch.Tensor]:
    """An engine: receive one broadcast per (dtype, shape), in order, or (``packed``) one of the
    bucket's bytes, viewed as its tensors; returns once all have arrived."""
    _check(dtypes)
    shapes = [[int(x) for x in s] for s in shapes]
    with _on_device(group):
        if packed:
            spans, total = packed_layout(dtypes, shapes)
            out = []
            if total:
                raw = torch.empty(total, dtype=torch.uint8, device=group.device)
                group.pg.broadcast(raw, 0).wait()
                for (offset, n), d, s in zip(spans, dtypes, shapes):
                    out.append(raw[offset : offset + n].view(DTYPES[d]).reshape(s))
            else:
                out = [torch.empty(s, dtype=DTYPES[d], device=group.device) for d, s in zip(dtypes, shapes)]
        else:
            out = []
            for d, s in zip(dtypes, shapes):
                t = torch.empty(s, dtype=DTYPES[d], device=group.device)
                group.pg.broadcast(t, 0).wait()
                out.append(t)
        if group.device.type == "cuda":  # the engine's thread reads them on another stream
            torch.cuda.current_stream(group.device).synchronize()
    return out
