"""Host-to-device copies through reused pinned buffers keep values, dtypes and shapes; parked tensors
come back with their values, in place."""

from __future__ import annotations

import pytest
import torch

from miles_core.devices import Parking, to_device, to_device_many


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


def _park_set(device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g).to(device)
    other = torch.randn(5, generator=g).to(device).to(torch.bfloat16)
    tensors = [base, base[1:3], other, torch.empty(0, device=device)]  # a view shares base's storage
    return tensors, [t.clone() for t in tensors]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("wait", [True, False])
def test_parked_tensors_come_back_in_place(device, wait):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tensors, values = _park_set(device)
    parking = Parking()
    for round_ in range(3):  # the host buffers are reused
        assert parking.park(tensors, wait=wait) == (24 * 4 + 5 * 2)
        if not wait:
            assert tensors[0].untyped_storage().nbytes() > 0  # freed only at release
            parking.release()
        assert parking.parked and all(t.untyped_storage().nbytes() == 0 for t in tensors[:3])
        parking.unpark(wait=wait)
        parking.ready()
        assert not parking.parked
        for t, v in zip(tensors, values):
            assert torch.equal(t, v), round_
        tensors[0].add_(1)  # the next park carries the new values
        values = [t.clone() for t in tensors]


def test_unparking_a_park_that_was_never_released_keeps_the_values():
    tensors, values = _park_set("cpu")
    parking = Parking()
    parking.park(tensors, wait=False)
    parking.unpark()
    assert not parking.parked and all(torch.equal(t, v) for t, v in zip(tensors, values))
    with pytest.raises(RuntimeError, match="already parked"):
        parking.park(tensors)
        parking.park(tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unpark_without_waiting_is_ordered_before_the_next_kernel():
    """128 MB copied in on the side stream: a kernel queued after `ready` reads every byte of it."""
    x = torch.arange(16 << 20, device="cuda")
    parking = Parking()
    parking.park([x])
    parking.unpark(wait=False)
    parking.ready()
    assert x.sum().item() == (16 << 20) * ((16 << 20) - 1) // 2
