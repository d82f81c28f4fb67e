"""Host-to-device copies through reused pinned buffers keep values, dtypes and shapes."""

from __future__ import annotations

import pytest
import torch

from miles_core.devices import to_device, to_device_many


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 100, (3, 5), generator=g),
        torch.rand(7, generator=g) > 0.5,
        torch.randn(2, 3, 4, generator=g)[:, 1],  # not contiguous
        torch.tensor(2.5, dtype=torch.float64),
        torch.empty(0, dtype=torch.int32),
        torch.randn(11, generator=g).to(torch.bfloat16),
    ]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_many_tensors_in_one_transfer(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    outs = []
    for seed in range(40):  # buffers get reused (and new ones taken while transfers are in flight)
        host = _tensors(seed)
        outs.append((host, to_device_many(host, device)))
        assert torch.equal(to_device(host[0], device).cpu(), host[0])
    for host, dev in outs:
        for h, d in zip(host, dev):
            assert d.device.type == device and d.dtype == h.dtype and d.shape == h.shape
            assert torch.equal(d.cpu(), h)
