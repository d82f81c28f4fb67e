"""One trainer rank of a scaled-out run: the body of a Ray actor (`TrainGroup` creates N of them).

The rank joins the trainers' process group (gloo on CPU, NCCL on CUDA), builds its FSDP2 shard of the
policy (`miles_core.distributed.trainer`) and runs what the driver asks, every rank in the same order:
train on a rollout, gather the weights for the engines, save or load a checkpoint, offload. Weights
reach the engines from here, not through the driver:

- disaggregated: rank 0 sends the gathered weights with `WeightUpdater` (a broadcast to every engine,
  over NCCL from its GPU bucket by bucket as they are gathered when the engines have GPUs of their own,
  else Gloo; or safetensors over HTTP) and keeps a CPU copy, to catch up an engine that restarts;
- colocated: each rank that shares a device with an engine hands it the gathered buckets in place
  (`serve.ipc`: CUDA IPC handles, or shared memory on CPU).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from miles_core.logging import get_logger

log = get_logger(__name__)


def free_address() -> tuple[str, int]:
    """This node's address (loopback when Ray runs on it) and a free port on it, for rank 0's store."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


class TrainRank:
    """Trainer rank ``rank`` of ``world`` (wrapped with ``ray.remote`` by `TrainGroup`)."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, threads: int) -> None:
        self.args, self.rank, self.world = args, rank, world
        torch.set_num_threads(max(1, threads))
        # Ray gives a GPU actor its device(s) through CUDA_VISIBLE_DEVICES: ours is the first visible.
        cuda = (
            args.device is not None
            and args.device.startswith("cuda")
            or (args.device is None and torch.cuda.is_available())
        )
        self.device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        self.trainer: Any = None
        self._updater: Any = None
        self._bg: Any = None

    # ---------------------------------------------------------------- set-up

    def address(self) -> tuple[str, int]:
        return free_address()

    def setup(self, master: tuple[str, int], weights: str) -> dict[str, Any]:
        """Join the process group and build this rank's shard of the policy from the HF folder
        ``weights``; returns where it runs."""
        from miles_core.distributed.trainer import build_rank_trainer, init_rank
        from miles_core.plugins import configure_plugins, get_plugin_manager

        pm = get_plugin_manager(disable=self.args.disable_plugins)
        configure_plugins(pm, self.args)
        init_rank(self.rank, self.world, master[0], master[1], self.device)
        self.trainer = build_rank_trainer(self.args, pm, weights, self.device)
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}

    # ---------------------------------------------------------------- training

    def train(self, rollout_id: int, batch: Any) -> list[dict[str, float]]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        steps = self.trainer.train(rollout_id, batch)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
            for s in steps:
                s["peak_memory_gb"] = peak
        return steps

    def offload(self) -> float:
        t0 = time.perf_counter()
        self.trainer.offload()
        return time.perf_counter() - t0

    def onload(self) -> float:
        t0 = time.perf_counter()
        self.trainer.onload()
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- checkpoints

    def save_state(self, folder: str) -> None:
        """This rank's shard of the optimizer state (and, rank 0, the step) under ``folder``."""
        self.trainer.save_state(Path(folder))

    def save_model(self, path: str, tokenizer_src: str | None) -> None:
        self.trainer.save_model(Path(path), tokenizer_src)

    def load_state(self, folder: str) -> None:
        self.trainer.load_state(Path(folder))

    def full_weights(self) -> list[tuple[str, torch.Tensor]] | None:
        """Every rank gathers; rank 0 returns the full weights on the CPU (the others None)."""
        out = [(n, t.to("cpu", copy=True)) for b in self._buckets() for n, t in b]
        return out if self.rank == 0 else None

    # ---------------------------------------------------------------- weights to the engines

    def _buckets(self, fused_experts: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return self.trainer.full_weights(self.args.update_weight_buffer_size, fused_experts=fused_experts)

    def push_weights(
        self, version: int, mode: str, start_weights: str, folder: str, urls: list[str]
    ) -> str | None:
        """Disaggregated: gather the weights (every rank); rank 0 sends each bucket to the engines
        ``urls`` as it is gathered and keeps them as ``version`` (`WeightUpdater.push`: from this GPU over
        NCCL when the engines are on GPUs of their own). Rank 0 returns why sending failed (the weights
        are kept all the same), not raising it: the other ranks would be stopped with it."""
        stream = self._gathered()
        if stream is None:
            return None
        try:
            self._updater_for(mode, start_weights, folder).push(urls, stream, version)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Rank 0: the gathered weights, lazily; the other ranks take part in each gather here."""
        stream = (pair for bucket in self._buckets() for pair in bucket)
        if self.rank == 0:
            return stream
        for _ in stream:
            pass
        return None

    def _updater_for(self, mode: str, start_weights: str, folder: str) -> Any:
        if self._updater is None:
            from miles_core.serve.remote import LoopThread
            from miles_core.serve.updater import WeightUpdater

            self._bg = LoopThread("miles-rank0-weights")
            self._updater = WeightUpdater(
                mode,
                self._bg,
                start_weights,
                Path(folder),
                bucket_bytes=self.args.update_weight_buffer_size,
            )
        return self._updater

    def send_weights(self, urls: list[str], version: int) -> float:
        """Rank 0: load the kept weights (labelled ``version``) into the engines ``urls``."""
        t0 = time.perf_counter()
        self._updater.relabel(version)
        self._updater.send(urls)
        return time.perf_counter() - t0

    def hand_over(self, url: str | None, version: int) -> float:
        """Colocated: gather the weights (every rank); a rank given its engine's ``url`` hands it each
        bucket in place, each layer's experts fused (miles' engines take them so). The AdamW state's copies
        to the host start first and overlap the gathering (`offload` then frees it). Returns the seconds
        it took."""
        from miles_core.serve import ipc
        from miles_core.serve.remote import post_json

        t0 = time.perf_counter()
        self.trainer.start_offload()
        for bucket in self._buckets(fused_experts=True):
            if url is not None:
                blob = ipc.share_tensors(ipc.flatten(bucket))  # one handle per dtype, not per tensor
                body = {"serialized_named_tensors": [blob], "weight_version": str(version)}
                post_json(url + "/update_weights_from_tensor", body)  # the tensors live until it answers
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._updater is not None:
            self._updater.close()
        if self._bg is not None:
            self._bg.stop()
        from miles_core.distributed.trainer import close_rank

        close_rank()
