"""The trainer's side of weight updates over HTTP: push new weights to engine servers, and catch up an
engine that restarted.

``--update-weights-mode``:

- ``tensor``: ``/update_weights_from_tensor`` with safetensors blobs (`protocol.encode_tensors`), one
  bounded bucket a request, every engine at once. `miles serve` only (SGLang's blobs are pickles).
- ``disk``: the weights are written as an HF checkpoint folder (atomically) under
  ``<run-dir>/rollout_weights/v<version>`` and every engine loads it (``/update_weights_from_disk``);
  the previous folder is deleted once all have.
- ``distributed``: a standalone process group (this process is rank 0, master of its TCPStore, each
  engine one rank after ``/init_weights_update_group``); per bucket every engine gets
  ``/update_weights_from_distributed`` while this thread broadcasts the tensors in the same order. The
  backend is NCCL when the tensors are on this process's GPU and every engine runs on a GPU of its own
  (`weight_sync.choose_backend`, from each engine's ``/get_server_info``), Gloo otherwise. Under NCCL
  `push` broadcasts each bucket from the GPU as it comes (nothing passes through host memory on the way
  to the engines); under Gloo the tensors go from the host copy. Engines that take a bucket packed
  (`miles serve`) get it as one broadcast; others (SGLang) one broadcast a tensor. The group is rebuilt
  when the set of engines changes.

What a restarted engine needs to catch up is kept: in disk mode the last folder, otherwise a CPU copy of
the last update's tensors (one copy of the model in host memory; under NCCL pinned buffers, filled on a
side stream while the broadcasts run, reused from update to update). It is caught up through its mode
(distributed: a fresh group of two, this process and that engine).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import shutil
import socket
import threading
import uuid
from collections.abc import Awaitable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from miles_core.logging import get_logger
from miles_core.model import set_config_dtype, write_hf_checkpoint
from miles_core.serve import weight_sync
from miles_core.serve.protocol import encode_tensors
from miles_core.serve.remote import LoopThread, get_json

log = get_logger(__name__)

BUCKET_BYTES = 64 << 20  # raw tensor bytes per request (HTTP body or broadcast batch)
GROUP_TIMEOUT_S = 120.0
COPY_BACKLOG = 4  # NCCL pushes: buckets whose host copy may lag behind their broadcast, at least
MODES = ("tensor", "disk", "distributed")


def _buckets(
    named: Iterable[tuple[str, torch.Tensor]], limit: int
) -> Iterable[list[tuple[str, torch.Tensor]]]:
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        bucket.append((name, t))
        size += t.numel() * t.element_size()
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _local_address(url: str) -> str:
    """This machine's address as seen from the engine at ``url`` (the group's master address)."""
    parts = urlsplit(url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parts.hostname, parts.port or 80))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


class WeightUpdater:
    """Pushes updates to engines (by URL) and catches up a restarted one (see the module docstring).

    :param mode: one of `MODES`.
    :param start_weights: the HF folder the engines were started from (served as ``version``).
    :param folder: where disk mode writes its checkpoints.
    :param ranks_per_engine: ranks an engine takes in a distributed group (SGLang: its TP size).
    """

    def __init__(
        self,
        mode: str,
        bg: LoopThread,
        start_weights: str,
        folder: Path,
        *,
        bucket_bytes: int = BUCKET_BYTES,
        ranks_per_engine: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"update mode {mode!r} is not one of {', '.join(MODES)}.")
        self.mode, self._bg, self._post = mode, bg, bg.post
        self.bucket_bytes = bucket_bytes
        self.ranks_per_engine = ranks_per_engine
        self.version = 0
        # Absolute: an engine resolves a model_path against its own working directory.
        self.start_weights = start_weights = str(Path(start_weights).resolve())
        self.folder = Path(folder).resolve()
        self._config = json.loads((Path(start_weights) / "config.json").read_text())
        self._path = start_weights  # the folder that holds the current weights (None: the CPU copy does)
        self._cpu: list[tuple[str, torch.Tensor]] | None = None
        self._pinned: dict[str, torch.Tensor] = {}  # NCCL pushes: the host copy's buffers, reused
        self._copied: Any = None  # a CUDA event: the host copy of the last NCCL push is complete
        self._device = torch.device("cpu")  # where the last pushed tensors lived
        self._group: weight_sync.WeightGroup | None = None
        self._group_urls: list[str] = []
        self._group_from = self._device

    # ---------------------------------------------------------------- public

    def push(self, urls: list[str], named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Keep ``named`` as the weights of ``version`` and load them into every engine of ``urls`` (the
        caller pauses generation): over NCCL each bucket is broadcast as it comes (see the module), else
        `keep` then `send`. ``named`` is always consumed to its end (a trainer rank's gather is
        collective). If sending fails, the weights are still kept: `send` to the engines that are left."""
        named = iter(named)
        first = next(named, None)
        if first is not None:
            self._device = first[1].device
            named = itertools.chain([first], named)
        if first is None or self.mode != "distributed" or not urls or self._device.type != "cuda":
            self.keep(named, version)
            self.send(urls)
            return
        try:
            group = self._group_for(urls)
        except BaseException:
            self.keep(named, version)
            raise
        if group.backend != "nccl":
            self.keep(named, version)
            self.send(urls)
            return
        self._stream(group, urls, named, version)

    def keep(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Make ``named`` the current weights (disk: a new folder, the previous one deleted; else a CPU
        copy)."""
        self.wait_kept()
        if self.mode == "disk":
            tensors = dict(named)
            config = dict(self._config)
            floating = next((t for t in tensors.values() if t.is_floating_point()), None)
            if floating is not None:
                set_config_dtype(config, floating.dtype)
            path = self.folder / f"v{version}"
            write_hf_checkpoint(tensors, config, path)  # atomic: complete or absent
            old, self._path = self._path, str(path)
            if old is not None and old != self._path and Path(old).parent == self.folder:
                shutil.rmtree(old, ignore_errors=True)
        else:
            self._cpu = [(n, t.detach().to("cpu", copy=True)) for n, t in named]
            self._path = None
            self._pinned = {}
        self.version = version

    def relabel(self, version: int) -> None:
        """Call the weights now kept ``version`` (a resumed run: the engines serve its checkpoint); then
        `send` them."""
        self.version = version

    def send(self, urls: list[str]) -> None:
        """Load the current weights into the engines ``urls`` (those already serving them are skipped
        only in the one case known here: the start weights as version 0)."""
        if not urls:
            return
        self.wait_kept()
        if self._path is not None:
            if self._path != self.start_weights or self.version != 0:
                body = {"model_path": self._path, "weight_version": str(self.version)}
                self._all(urls, "/update_weights_from_disk", body)
        elif self.mode == "tensor":
            for bucket in _buckets(self._cpu, self.bucket_bytes):
                # Base64 needs no JSON escaping: the body is put together as bytes, which saves
                # json.dumps a pass over hundreds of megabytes.
                blob = encode_tensors(bucket).encode("ascii")
                head = b'{"weight_version": "%d", "serialized_named_tensors": ["' % self.version
                self._all(urls, "/update_weights_from_tensor", head + blob + b'"]}')
        else:
            group = self._group_for(urls)
            try:
                self._send_group(group, urls, self._cpu, self.version)
            except BaseException:
                self._destroy_group(failed=True)  # a member died mid-update: rebuilt at the next send
                raise

    @property
    def backend(self) -> str | None:
        """The backend of the distributed group now formed (``gloo`` or ``nccl``), or None."""
        return None if self._group is None else self._group.backend

    def close(self) -> None:
        """Leave the distributed group (the engines' side goes with them)."""
        self._destroy_group()

    def _run(self, coro: Awaitable[Any]) -> Any:
        return self._bg.run(coro)

    def _all(self, urls: list[str], path: str, body: dict | bytes) -> list[dict]:
        """``path`` on every engine at once; waits for all, then raises the first failure."""

        async def gather() -> list[Any]:
            return list(
                await asyncio.gather(*(self._post(u, path, body) for u in urls), return_exceptions=True)
            )

        answers = self._run(gather())
        for a in answers:
            if isinstance(a, BaseException):
                raise a
        return answers

    # ---------------------------------------------------------------- distributed groups

    def _group_for(self, urls: list[str]) -> weight_sync.WeightGroup:
        """The group of this process and the engines ``urls`` (built anew when they, or the device the
        tensors come from, changed)."""
        if self._group is None or self._group_urls != urls or self._group_from != self._device:
            self._destroy_group()
            infos = [get_json(u + "/get_server_info") for u in urls]
            packed = all(i.get("packed_broadcast") is True for i in infos)
            self._group = self._init_group(urls, self._backend(infos, self._device), packed)
            self._group_urls, self._group_from = list(urls), self._device
        return self._group

    def backend_for(self, urls: list[str], device: torch.device | str) -> str:
        """The backend of a group of this process, sending tensors that live on ``device``, and the
        engines ``urls``: `weight_sync.choose_backend`, from each engine's ``/get_server_info``."""
        return self._backend([get_json(u + "/get_server_info") for u in urls], device)

    @staticmethod
    def _backend(infos: list[dict], device: torch.device | str) -> str:
        device = torch.device(device)
        mine = weight_sync.gpu_uuid(device) if device.type == "cuda" and torch.cuda.is_available() else None
        return weight_sync.choose_backend(device, infos, mine)

    def _init_group(self, urls: list[str], backend: str, packed: bool) -> weight_sync.WeightGroup:
        """Create the group: this process rank 0 (TCPStore master), engine i from rank 1 + i*ranks;
        ``packed``: send each bucket as one broadcast (every engine takes it so)."""
        name = f"miles-{uuid.uuid4().hex[:12]}"
        world = 1 + self.ranks_per_engine * len(urls)
        address = _local_address(urls[0])
        device = weight_sync.group_device(backend, self._device)
        timeout = timedelta(seconds=GROUP_TIMEOUT_S)
        store = dist.TCPStore(address, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
        made: dict[str, Any] = {}

        def make_pg() -> None:
            try:  # Gloo's blocks until the engines have joined
                made["pg"] = weight_sync.make_pg(store, name, 0, world, backend, GROUP_TIMEOUT_S)
            except Exception as e:  # reported below
                made["error"] = e

        joiner = threading.Thread(target=make_pg, name="miles-weight-group", daemon=True)
        joiner.start()

        async def join() -> list[dict]:
            return list(
                await asyncio.gather(
                    *(
                        self._post(
                            u,
                            "/init_weights_update_group",
                            {
                                "master_address": address,
                                "master_port": store.port,
                                "rank_offset": 1 + i * self.ranks_per_engine,
                                "world_size": world,
                                "group_name": name,
                                "backend": backend,
                            },
                        )
                        for i, u in enumerate(urls)
                    )
                )
            )

        self._run(join())
        joiner.join(GROUP_TIMEOUT_S)
        if "pg" not in made:
            raise RuntimeError(f"the weight update group did not form: {made.get('error', 'timed out')}")
        log.info("weight update group %s: %s, %d engines%s", name, backend, len(urls), ", packed" * packed)
        return weight_sync.WeightGroup(name, 0, world, backend, store, made["pg"], device, packed)

    def _send_group(
        self,
        group: weight_sync.WeightGroup,
        urls: list[str],
        named: list[tuple[str, torch.Tensor]],
        version: int,
    ) -> None:
        for bucket in _buckets(named, self.bucket_bytes):
            self._send_bucket(group, urls, bucket, version)

    def _send_bucket(
        self,
        group: weight_sync.WeightGroup,
        urls: list[str],
        bucket: list[tuple[str, torch.Tensor]],
        version: int,
    ) -> None:
        """Every engine starts receiving ``bucket`` (HTTP) while this thread broadcasts it, in order;
        returns when every engine has loaded it."""
        body = {**weight_sync.tensor_specs(bucket), "group_name": group.name, "weight_version": str(version)}
        if group.packed:
            body["packed"] = True

        async def gather() -> list[dict]:
            return list(
                await asyncio.gather(*(self._post(u, "/update_weights_from_distributed", body) for u in urls))
            )

        receiving = self._bg.submit(gather())
        weight_sync.send(group, (t for _, t in bucket), group.packed)
        self._bg.wait(receiving)

    def _stream(
        self,
        group: weight_sync.WeightGroup,
        urls: list[str],
        named: Iterable[tuple[str, torch.Tensor]],
        version: int,
    ) -> None:
        """NCCL: broadcast each bucket from the GPU as it comes, and copy it to the host copy on a side
        stream meanwhile. The copies may lag behind (PCIe is slower than NVLink): by `COPY_BACKLOG`
        buckets, or by half the device memory that the caching allocator has not reserved, whichever is
        more (the lagging buckets' GPU memory is held until they are copied); past that each bucket waits
        for the oldest copy. The rest finishes after this returns (`wait_kept`). A failed broadcast
        leaves the group; the rest is still consumed and kept."""
        self.wait_kept()
        device = group.device
        copier = torch.cuda.Stream(device)
        allowance = max(COPY_BACKLOG * self.bucket_bytes, torch.cuda.mem_get_info(device)[0] // 2)
        kept: list[tuple[str, torch.Tensor]] = []
        error: BaseException | None = None
        copying: collections.deque[tuple[Any, int]] = collections.deque()
        lagging = 0  # bytes whose copy may not have finished
        for bucket in _buckets(named, self.bucket_bytes):
            if error is None:
                try:
                    self._send_bucket(group, urls, bucket, version)
                except BaseException as e:  # raised once the weights are kept
                    error = e
                    self._destroy_group(failed=True)
            copier.wait_stream(torch.cuda.current_stream(device))  # the bucket's tensors are ready
            with torch.cuda.stream(copier):
                for name, t in bucket:
                    kept.append((name, self._host_copy(name, t)))
                    t.record_stream(copier)  # its memory is not reused before the copy is done
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            copying.append((copier.record_event(), size))
            lagging += size
            while lagging > allowance and len(copying) > 1:
                event, size = copying.popleft()
                event.synchronize()
                lagging -= size
        done = torch.cuda.Event()
        done.record(copier)
        self._cpu, self._path, self.version, self._copied = kept, None, version, done
        self._pinned = dict(kept)
        if error is not None:
            raise error

    def _host_copy(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied (queued on the current stream) into its pinned buffer, made when first needed."""
        buf = self._pinned.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t.detach(), non_blocking=True)

    def wait_kept(self) -> None:
        """Wait until the host copy of the last NCCL push is complete (done before it is read or
        replaced)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _destroy_group(self, failed: bool = False) -> None:
        """Leave the group; ``failed``: a broadcast did not finish, so an NCCL communicator is aborted
        (its kernels may wait for a dead engine, and NCCL's watchdog would end this process)."""
        group, urls = self._group, self._group_urls
        self._group, self._group_urls = None, []
        if group is None:
            return
        if failed:
            weight_sync.abort(group)

        async def leave() -> None:
            await asyncio.gather(
                *(self._post(u, "/destroy_weights_update_group", {"group_name": group.name}) for u in urls),
                return_exceptions=True,  # an engine that died has nothing to leave
            )

        self._run(leave())
