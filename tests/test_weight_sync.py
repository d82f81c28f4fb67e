"""Weights over a process group (`serve.weight_sync`, `serve.updater`): which backend a trainer and its
engines get, buckets in order, and `--update-weights-mode distributed` into real `miles serve` processes
landing bit for bit (Gloo on CPU; NCCL from the trainer's GPU on a machine with two GPUs)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest
import torch
from serve_client_helpers import client_over
from serve_helpers import http_json, served, served_many

from miles_core.model import load_model, named_hf_tensors
from miles_core.serve import weight_sync
from miles_core.serve.remote import LoopThread
from miles_core.serve.updater import WeightUpdater, _buckets
from miles_core.serve.weight_sync import choose_backend

TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL needs two GPUs: two ranks of a group cannot share one"
)


@contextlib.contextmanager
def distributed_updater(ckpt, tmp_path):
    """A `WeightUpdater` in ``distributed`` mode with 4096-byte buckets; its group and thread stopped at
    exit."""
    bg = LoopThread("test-weights")
    up = WeightUpdater("distributed", bg, str(ckpt), tmp_path / "w", bucket_bytes=4096)
    try:
        yield up
    finally:
        up.close()
        bg.stop()


def landed(url: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """Every weight of ``named`` is in the engine at ``url``, bit for bit."""
    for name, t in named:
        code, rows = http_json("POST", url + "/get_weights_by_name", {"name": name, "truncate_size": 1 << 30})
        assert code == 200, rows
        got = torch.tensor(rows, dtype=torch.float32).reshape(t.shape)
        assert torch.equal(got, t.detach().float().cpu()), name


def test_nccl_only_when_the_trainer_and_every_engine_have_a_gpu_of_their_own():
    gpu1, gpu2 = {"device": "cuda:0", "gpu_uuid": "GPU-1"}, {"device": "cuda", "gpu_uuid": "GPU-2"}
    assert choose_backend("cuda:0", [gpu1], "GPU-0") == "nccl"
    assert choose_backend(torch.device("cuda", 3), [gpu1, gpu2], "GPU-0") == "nccl"
    assert choose_backend("cuda", [{"device": "cuda"}]) == "nccl"  # SGLang says its device, not its GPU
    # a CPU engine, trainer, or an engine that does not say: Gloo
    assert choose_backend("cuda:0", [{"device": "cpu", "gpu_uuid": None}], "GPU-0") == "gloo"
    assert choose_backend("cuda:0", [gpu1, {"device": "cpu"}], "GPU-0") == "gloo"
    assert choose_backend("cpu", [gpu1, gpu2]) == "gloo"
    assert choose_backend("cuda:0", [gpu1, {}], "GPU-0") == "gloo"
    assert choose_backend("cuda:0", [], "GPU-0") == "gloo"
    # two ranks of one NCCL group on one GPU: Gloo
    assert choose_backend("cuda:0", [gpu1], "GPU-1") == "gloo"
    assert choose_backend("cuda:0", [gpu1, dict(gpu1)], "GPU-0") == "gloo"


def test_buckets_keep_the_order_and_close_at_the_limit():
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 1]  # float32: 4 bytes an element, the limit is 16 bytes
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    got = [[n for n, _ in b] for b in _buckets(named, 16)]
    assert got == [["w0", "w1"], ["w2"], ["w3", "w4"], ["w5"], ["w6", "w7"], ["w8"]]


def _pair() -> tuple[weight_sync.WeightGroup, weight_sync.WeightGroup]:
    """Rank 0 and rank 1 of a Gloo group in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    made: dict = {}
    join = lambda rank: weight_sync.join_group("127.0.0.1", port, rank, 2, "p", timeout_s=20)  # noqa: E731
    t = threading.Thread(target=lambda: made.update(r0=join(0)))
    t.start()
    r1 = join(1)
    t.join(60)
    return made["r0"], r1


@pytest.mark.parametrize("packed", [True, False])
def test_a_bucket_of_mixed_dtypes_and_sizes_arrives_exactly_packed_or_not(packed):
    """Packed, each tensor's bytes start at a multiple of 16 and come back exactly, FP8 too (Gloo has no
    float8 broadcast: packed goes as bytes, so FP8 weights cross Gloo only packed)."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3, 5, generator=g).bfloat16(),  # 30 bytes: the next one starts after padding
        torch.randn(7, generator=g),
        torch.randint(-(2**40), 2**40, (3,), generator=g),
        torch.randn(2, 3, generator=g).to(torch.float8_e4m3fn),
        torch.tensor(1.5, dtype=torch.float16),  # 0-dim
        torch.empty(0, 4),
        torch.randn(4, 6, generator=g)[:, ::2],  # strided
        torch.randint(0, 255, (5,), dtype=torch.uint8, generator=g),
    ]
    if not packed:
        tensors = [t for t in tensors if t.dtype != torch.float8_e4m3fn]
    specs = weight_sync.tensor_specs((str(i), t) for i, t in enumerate(tensors))
    spans, total = weight_sync.packed_layout(specs["dtypes"], specs["shapes"])
    assert all(o % weight_sync.ALIGN == 0 for o, _ in spans) and spans[1] == (32, 28)
    assert total == sum(-(-n // 16) * 16 for _, n in spans)
    r0, r1 = _pair()
    sender = threading.Thread(target=weight_sync.send, args=(r0, tensors, packed))
    sender.start()
    got = weight_sync.receive(r1, specs["dtypes"], specs["shapes"], packed)
    sender.join(60)
    assert len(got) == len(tensors)

    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().reshape(-1).view(torch.uint8)

    for want, have in zip(tensors, got):
        assert have.dtype == want.dtype and have.shape == want.shape
        assert torch.equal(raw(have), raw(want))


def test_cpu_engines_get_gloo_even_from_a_cuda_trainer(tiny_ckpt, tmp_path):
    """The engines are asked: CPU ones never get NCCL, whatever the trainer's device."""
    with served(tiny_ckpt, tmp_path) as server:
        info = server.get("/get_server_info")
        assert info["device"] == "cpu" and info["gpu_uuid"] is None
        with distributed_updater(tiny_ckpt, tmp_path) as up:
            assert up.backend_for([server.url], "cuda:0") == "gloo"
            assert up.backend_for([server.url], "cpu") == "gloo"


def test_distributed_updates_land_bit_for_bit_in_buckets_over_gloo(tiny_ckpt, tiny_ckpt_b, tmp_path):
    """Through `HttpEngine.update_weights` with --update-weight-buffer-size 4096 (about 20 buckets of the
    tiny model): every weight arrives exactly, in two engines, twice over one group; the NCCL_*
    environment is left as it was."""
    nccl_env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    b = list(named_hf_tensors(load_model(tiny_ckpt_b)))
    a = list(named_hf_tensors(load_model(tiny_ckpt)))
    assert sum(t.numel() * t.element_size() for _, t in b) > 10 * 4096
    with served_many(tiny_ckpt, tmp_path / "servers", 2) as servers:
        flags = ("--update-weights-mode", "distributed", "--update-weight-buffer-size", "4096")
        with client_over(tmp_path, tiny_ckpt, tuple(servers), *flags) as client:
            assert client.updater.bucket_bytes == 4096
            client.update_weights(b, version=1)
            group = client.updater._group
            assert group.backend == "gloo" and group.world_size == 3 and group.packed  # miles engines
            for s in servers:
                landed(s.url, b)
            client.update_weights(a, version=2)
            assert client.updater._group is group  # the same engines: the same group
            for s in servers:
                landed(s.url, a)
                assert s.get("/get_server_info")["weight_version"] == "2"
    assert {k: v for k, v in os.environ.items() if k.startswith("NCCL_")} == nccl_env


def test_a_push_that_fails_keeps_the_weights_for_the_engines_left(tiny_ckpt, tiny_ckpt_b, tmp_path):
    b = list(named_hf_tensors(load_model(tiny_ckpt_b)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    with served(tiny_ckpt, tmp_path) as server:
        with distributed_updater(tiny_ckpt, tmp_path) as up:
            with pytest.raises(OSError):
                up.push([server.url, dead], iter(b), 6)
            assert up.version == 6 and up.backend is None
            up.send([server.url])
            landed(server.url, b)
            assert server.get("/get_server_info")["weight_version"] == "6"


def test_get_weights_by_name_says_what_is_wrong(tiny_ckpt, tmp_path):
    with served(tiny_ckpt, tmp_path) as server:
        code, rows = http_json("POST", server.url + "/get_weights_by_name", {"name": "model.norm.weight"})
        assert code == 200 and len(rows) == 32  # hidden size: one row, all of it
        for body in ({"name": "nope"}, {"name": "model.norm.weight", "truncate_size": 0}):
            code, answer = http_json("POST", server.url + "/get_weights_by_name", body)
            assert code == 400 and answer["error"]["message"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_trainer_sends_to_a_cpu_engine_over_gloo(tiny_ckpt, tiny_ckpt_b, tmp_path):
    named = list(named_hf_tensors(load_model(tiny_ckpt_b).to("cuda")))
    with served(tiny_ckpt, tmp_path) as server:
        with distributed_updater(tiny_ckpt, tmp_path) as up:
            up.push([server.url], named, 1)
            assert up.backend == "gloo"
            landed(server.url, named)


@pytest.mark.gpu
@TWO_GPUS
def test_nccl_push_from_the_trainer_gpu_lands_and_a_restart_catches_up(tiny_ckpt, tiny_ckpt_b, tmp_path):
    """Trainer on cuda:0, engine on cuda:1: NCCL, buckets broadcast from the GPU; the pinned host copy
    equals what was sent and catches the engine up after it went back to other weights."""
    named = list(named_hf_tensors(load_model(tiny_ckpt_b).to("cuda:0")))
    with served(tiny_ckpt, tmp_path, "--device", "cuda:1", "--rollout-dtype", "float32") as server:
        assert server.get("/get_server_info")["gpu_uuid"]
        with distributed_updater(tiny_ckpt, tmp_path) as up:
            up.push([server.url], named, 1)
            assert up.backend == "nccl"
            landed(server.url, named)
            up.wait_kept()
            assert [n for n, _ in up._cpu] == [n for n, _ in named]
            for (_, t), (_, h) in zip(named, up._cpu):
                assert h.is_pinned() and torch.equal(h, t.cpu())
            code, _ = server.post("/update_weights_from_disk", {"model_path": str(tiny_ckpt)})
            assert code == 200
            up.send([server.url])  # from the host copy, as a restarted engine is caught up
            landed(server.url, named)
            assert server.get("/get_server_info")["weight_version"] == "1"
