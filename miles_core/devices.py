"""Host-to-device copies that do not wait for the GPU."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (a CPU tensor) on `device`. To CUDA it goes through pinned memory, non-blocking: a plain copy
    synchronises the stream, so the host could not queue work while the GPU runs what came before."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
