"""Host-to-device copies that do not wait for the GPU.

A plain ``tensor.to("cuda")`` from pageable memory synchronises the stream, so the host could not queue
work while the GPU runs what came before. ``tensor.pin_memory()`` per copy avoids that but allocates
page-locked memory each time, which costs milliseconds (measured 4-12 ms a call on the H200 machine for
a training micro-batch's inputs). Here copies go through a few reusable pinned buffers instead: a
buffer is reused once the transfer that last read it has finished (a CUDA event), and `to_device_many`
moves many small tensors in one transfer.
"""

from __future__ import annotations

import torch

_ALIGN = 16  # bytes; every tensor in a staged buffer starts on this boundary


class _PinnedRing:
    """Pinned host buffers, each with the event of the last transfer that read it."""

    def __init__(self) -> None:
        self.slots: list[list] = []  # [uint8 pinned buffer, torch.cuda.Event | None]

    def take(self, nbytes: int) -> list:
        for slot in self.slots:
            if slot[0].numel() >= nbytes and (slot[1] is None or slot[1].query()):
                return slot
        size = max(1 << 16, 1 << (nbytes - 1).bit_length())
        slot = [torch.empty(size, dtype=torch.uint8).pin_memory(), None]
        self.slots.append(slot)
        if len(self.slots) > 32:  # host far ahead of the GPU: forget the smallest finished buffer
            done = [s for s in self.slots[:-1] if s[1] is None or s[1].query()]
            if done:
                self.slots.remove(min(done, key=lambda s: s[0].numel()))
        return slot


_RINGS: dict[torch.device, _PinnedRing] = {}


def to_device_many(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """CPU `tensors` on `device`, in one non-blocking transfer through a reused pinned buffer."""
    device = torch.device(device)
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    offsets, n = [], 0
    for t in tensors:
        offsets.append(n)
        n += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    ring = _RINGS.setdefault(device, _PinnedRing())
    slot = ring.take(max(n, 1))
    host = slot[0].numpy()
    for t, o in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            # numpy's single-threaded memcpy: torch's CPU copy_ into the pinned buffer took 3-6 ms
            # for a few hundred KB on the GPU host (its intra-op thread pool), numpy takes microseconds.
            host[o : o + nbytes] = t.detach().reshape(-1).contiguous().view(torch.uint8).numpy()
    buf = slot[0]
    with torch.cuda.device(device):
        dev = buf[:n].to(device, non_blocking=True)
        slot[1] = torch.cuda.Event()
        slot[1].record()
    out = []
    for t, o in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        out.append(dev[o : o + nbytes].view(t.dtype).view(t.shape))
    return out


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (a CPU tensor) on `device`; to CUDA without waiting for the GPU (see the module docstring)."""
    return to_device_many([t], device)[0]


class Parking:
    """Device memory handed back and taken again *in place* (colocated training and rollout take turns
    on one GPU): `park` copies each distinct storage of the given tensors to a host buffer (pinned, and
    kept for the next time, when CUDA is there) and shrinks the storage to nothing; `unpark` grows it back
    and copies the bytes in. The tensor objects stay what they were, so views, an optimizer's references
    and DTensor wrappers need no re-wiring. (On an H100, a 0.7B model's AdamW state parked in 0.12 s
    where ``.to("cpu")`` into fresh pageable memory took 3.26 s; bench/colocate_grpo.py.)"""

    def __init__(self) -> None:
        self._hosts: list[torch.Tensor] = []  # reused in order: the same tensors park each time
        self._parked: list[tuple[torch.UntypedStorage, torch.Tensor]] = []

    @property
    def parked(self) -> bool:
        return bool(self._parked)

    def park(self, tensors: list[torch.Tensor]) -> int:
        """Move the storages of ``tensors`` out of device memory; returns the bytes moved."""
        if self._parked:
            raise RuntimeError("already parked; unpark first")
        storages, seen = [], set()
        for t in tensors:
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            storages.append(st)
        cuda = any(st.device.type == "cuda" for st in storages)
        for i, st in enumerate(storages):
            if i == len(self._hosts) or self._hosts[i].numel() != st.nbytes():
                host = torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=st.device.type == "cuda")
                self._hosts[i : i + 1] = [host]
            self._hosts[i].copy_(_bytes(st), non_blocking=True)
            self._parked.append((st, self._hosts[i]))
        if cuda:
            torch.cuda.synchronize()  # every copy landed before the memory goes
        for st, _ in self._parked:
            st.resize_(0)
        return sum(h.numel() for _, h in self._parked)

    def unpark(self) -> None:
        """Give every parked storage its bytes back (on its device)."""
        cuda = False
        for st, host in self._parked:
            st.resize_(host.numel())
            _bytes(st).copy_(host, non_blocking=True)
            cuda = cuda or st.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        self._parked = []


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
