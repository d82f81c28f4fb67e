"""Weights handed over in place to an engine on the same machine (colocated runs).

SGLang's ``/update_weights_from_tensor`` takes ``serialized_named_tensors``: base64 of a
``multiprocessing`` pickle of ``[(name, tensor), ...]``. Pickled that way a CUDA tensor travels as a CUDA
IPC handle and a CPU tensor as the name of a shared-memory file, so the receiver maps the sender's
memory instead of copying it through the request: the engine copies each tensor into its model once.
`share_tensors` writes such a blob and `load_shared` reads one. The sender keeps its tensors alive until
the engine has answered.

A pickle can run code when it is read, so `miles serve` takes one only from a peer on this machine (the
loopback address); from elsewhere it takes safetensors (`protocol.encode_tensors`).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp  # registers the tensor reductions with ForkingPickler

PICKLE_MAGIC = b"\x80"  # every pickle of protocol 2 or later starts with the PROTO opcode


def share_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """One ``serialized_named_tensors`` blob that hands ``named`` over in place (CUDA IPC handles, or
    shared memory for CPU tensors). CPU tensors are moved into shared memory (their storage is shared
    from then on, not copied again by a later call)."""
    # Shared-memory files can be opened by any process; the default (passing file descriptors) only
    # works between a process and the children it spawns.
    if mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump([(n, t.detach()) for n, t in named])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def flatten(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The same tensors as views of one contiguous buffer per dtype and device: pickled, a bucket then
    takes one CUDA IPC handle (one shared-memory file) per buffer instead of one per tensor, which the
    receiver opens once. The names and values are those of ``named``."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, (_, t) in enumerate(named):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: list[tuple[str, torch.Tensor] | None] = [None] * len(named)
    for (dtype, device), idx in groups.items():
        flat = torch.empty(sum(named[i][1].numel() for i in idx), dtype=dtype, device=device)
        at = 0
        for i in idx:
            name, t = named[i]
            view = flat[at : at + t.numel()].view(t.shape)
            view.copy_(t)
            out[i] = (name, view)
            at += t.numel()
    return out  # type: ignore[return-value]


def is_pickle(raw: bytes) -> bool:
    return raw[:1] == PICKLE_MAGIC


def load_shared(raw: bytes) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of a `share_tensors` blob (already base64-decoded); the tensors map the
    sender's memory. Raises ``ValueError`` when it holds anything else."""
    named = pickle.loads(raw)
    if not isinstance(named, list) or not all(
        isinstance(p, (tuple, list))
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], torch.Tensor)
        for p in named
    ):
        raise ValueError("the pickle does not hold a list of (name, tensor) pairs")
    return [(n, t) for n, t in named]


def is_local_peer(host: str | None) -> bool:
    """Whether a request came from this machine (a loopback address)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False
