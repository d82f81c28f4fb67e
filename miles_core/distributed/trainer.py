"""One trainer rank of a data-parallel run: the built-in `Trainer` with FSDP2 (`fully_shard`).

Every rank is given the same whole batch and returns the same metrics. A rank forwards only its share
of the samples (balanced by tokens); log-probs are all-gathered so every rank holds the batch's; each
optimizer step sums the ranks' gradients of the step-level loss, so it equals one process's step on the
whole batch. Parameters, gradients and AdamW state are sharded; with ``--bf16`` the fp32 shards are
the masters and FSDP gathers bf16 copies for compute (no `MasterAdamW`).

A rank process calls `init_rank`, then `build_rank_trainer` (and `ShardedTrainer.load_state` to
resume); every method below that says "collective" must be called by all ranks in the same order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from miles_core.devices import Parking
from miles_core.errors import UsageError
from miles_core.model import CausalLM, set_config_dtype, write_hf_checkpoint
from miles_core.model.hf_io import hf_tensors_of_state
from miles_core.train.models import load_train_models
from miles_core.train.optim import cast_weights
from miles_core.train.packing import balance_by_tokens
from miles_core.train.trainer import MicroBatch, Trainer
from miles_core.types import TrainBatch

STATE_FILE = "trainer_state.json"  # step count (and whether the DCP state holds fp32 masters)
OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint folder
BUCKET_BYTES = 512 * 2**20  # `named_weights` buckets (slime's --update-weight-buffer-size default)


def init_rank(
    rank: int, world_size: int, master_addr: str, master_port: int, device: str | torch.device,
    timeout_s: float = 1800.0,
) -> torch.device:  # fmt: skip
    """Join the default process group as `rank` of `world_size`: gloo on CPU, NCCL on CUDA (the rank's
    device becomes the current one). Returns the device to build the trainer on."""
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo",
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=dev if dev.type == "cuda" else None,
    )
    return dev


def close_rank() -> None:
    """Leave the process group (at the end of a rank process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def build_rank_trainer(
    args: argparse.Namespace, pm: Any, weights: str, device: str | torch.device
) -> ShardedTrainer:
    """Load the policy from `weights` (and, for a KL term, the reference model from
    ``--hf-checkpoint``) in fp32 on `device`, let plugins configure them, shard them and build the
    rank's trainer. Collective."""
    policy, ref = load_train_models(args, pm, weights, device)
    return ShardedTrainer(args, pm, policy, ref)


def shard_model(model: CausalLM, mesh: DeviceMesh, bf16: bool) -> None:
    """`fully_shard` each decoder layer, then the root (embeddings, final norm, lm_head: a tied lm_head
    stays one parameter). Gradients are summed over the ranks, not averaged: each rank's loss already
    has the whole step's denominators."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw: dict[str, Any] = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)


def _reshard(model: torch.nn.Module | None) -> None:
    # FSDP keeps the root's parameters gathered after a forward (for the backward that usually follows).
    if isinstance(model, FSDPModule):
        model.reshard()


class ShardedTrainer(Trainer):
    """The built-in trainer as one of ``dist.get_world_size()`` data-parallel ranks (FSDP2).

    The reference model is sharded too (with --bf16 in bf16): it is as large as the policy, and a
    forward-only model costs no more to shard than to keep whole.
    """

    def __init__(self, args: argparse.Namespace, pm: Any, model: CausalLM, ref_model: CausalLM | None = None):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = init_device_mesh(next(model.parameters()).device.type, (self.world_size,))
        shard_model(model, self.mesh, args.bf16)
        if ref_model is not None:
            if args.bf16:
                cast_weights(ref_model, torch.bfloat16)
            shard_model(ref_model, self.mesh, args.bf16)
        super().__init__(args, pm, model, ref_model)
        self._parking = Parking()  # the AdamW state while colocated engines generate (offload)

    def _make_optimizer(self, params: list[torch.nn.Parameter], adam: dict) -> torch.optim.Optimizer:
        # The sharded fp32 parameters are the masters under --bf16 too.
        return torch.optim.AdamW(params, fused=self.device.type == "cuda", **adam)

    def _autocast(self, model: CausalLM):
        # A sharded model computes in its MixedPrecisionPolicy's dtype.
        return contextlib.nullcontext() if isinstance(model, FSDPModule) else super()._autocast(model)

    # ------------------------------------------------------------------ the rank's share

    def _my_samples(self, batch: TrainBatch) -> list[int]:
        return balance_by_tokens([t.shape[0] for t in batch.tokens], self.world_size)[self.rank]

    def micro_batches(self, batch: TrainBatch, idx: list[int]) -> Iterator[MicroBatch]:
        """This rank's micro-batches over its samples `idx`, then fillers (its shortest sample again,
        with no weight) up to the most any rank has: FSDP needs every rank in each forward and backward.
        Collective."""
        own = len(self._micro_batch_groups(batch, idx))
        most = torch.tensor(own, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return self._with_fillers(batch, idx, int(most) - own)

    def _with_fillers(self, batch: TrainBatch, idx: list[int], fillers: int) -> Iterator[MicroBatch]:
        yield from super().micro_batches(batch, idx)
        if fillers:
            shortest = min(idx, key=lambda i: (batch.tokens[i].shape[0], i))
            filler = dataclasses.replace(next(super().micro_batches(batch, [shortest])), filler=True)
            for _ in range(fillers):
                yield filler

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, stage: str) -> list[torch.Tensor]:
        """This rank's share of the log-probs (and recorded routes), all-gathered. Collective."""
        out = super().compute_log_probs(batch, stage)
        _reshard(self.ref_model if stage == "ref" else self.model)
        mine = self._my_samples(batch)
        out = self._all_gather_samples(mine, out)
        if batch.record_routes and batch.recorded_routes is not None:
            batch.recorded_routes = self._all_gather_samples(mine, batch.recorded_routes)
        return out

    def _all_gather_samples(self, mine: list[int], pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's per-sample tensors (``pieces[i]`` for ``i`` in its share), on every rank."""
        shapes: list[Any] = [None] * self.world_size
        dist.all_gather_object(shapes, [(i, tuple(pieces[i].shape)) for i in mine])
        counts = [sum(math.prod(s) for _, s in share) for share in shapes]
        local = torch.cat([pieces[i].reshape(-1) for i in mine])
        send = torch.zeros(max(counts), dtype=local.dtype, device=self.device)
        send[: local.numel()] = local.to(self.device)
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(recv, send)
        out: list[torch.Tensor] = [torch.empty(0)] * len(pieces)
        for share, count, flat in zip(shapes, counts, recv):
            parts = flat[:count].cpu().split([math.prod(s) for _, s in share])
            for (i, shape), part in zip(share, parts):
                out[i] = part.view(shape)
        return out

    # ------------------------------------------------------------------ the step across ranks

    def _reduce_metrics(self, sums: dict[str, Any]) -> dict[str, Any]:
        """Sum each metric over the ranks (a rank's are its micro-batches' shares of the step's)."""
        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, list(sums))
        keys = list(dict.fromkeys(k for ranks_names in names for k in ranks_names))
        zero = torch.zeros((), device=self.device)
        values = torch.stack(
            [torch.as_tensor(sums.get(k, zero), dtype=torch.float32, device=self.device).detach().reshape(())
             for k in keys]
        )  # fmt: skip
        dist.all_reduce(values)
        return dict(zip(keys, values.unbind()))

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        self._parking.ready()  # the AdamW state `onload` brought back, read by the step after this
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):  # a partial norm of each rank's shards
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    # ------------------------------------------------------------------ weights

    def _full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's state-dict entries as full tensors, gathered one at a time (bf16 under --bf16, as
        the single-process trainer's weights are)."""
        _reshard(self.model)
        tied = self.model.config.tie_word_embeddings
        for name, t in self.model.state_dict(keep_vars=True).items():
            if tied and name == "lm_head.weight":
                continue  # the embedding, which HF checkpoints name once
            t = t.detach()
            if isinstance(t, DTensor):
                if self.args.bf16 and t.is_floating_point():
                    t = t.to(torch.bfloat16)  # before gathering: half the traffic
                t = t.full_tensor()
            yield name, t

    def full_weights(
        self, bucket_bytes: int, *, fused_experts: bool = False
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The policy's full weights as lists of ``(HF name, tensor)`` of about `bucket_bytes` each, in
        the names and order of `named_hf_tensors` of the unsharded model (with `fused_experts`, each
        layer's experts as its two 3-D tensors, which miles' engines load as they are: a few tensors
        where per-expert names make hundreds). Collective: every rank gets every bucket and must consume
        the whole iterator."""
        bucket: list[tuple[str, torch.Tensor]] = []
        used = 0
        tied = self.model.config.tie_word_embeddings
        for name, t in hf_tensors_of_state(self._full_state(), tied, fused_experts=fused_experts):
            size = t.numel() * t.element_size()
            if bucket and used + size > bucket_bytes:
                yield bucket
                bucket, used = [], 0
            bucket.append((name, t))
            used += size
        if bucket:
            yield bucket

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: see `full_weights`."""
        for bucket in self.full_weights(BUCKET_BYTES):
            yield from bucket

    def save_model(self, path: str | Path, tokenizer_src: str | None = None) -> None:
        """Rank 0 writes the policy as an HF checkpoint (what `Trainer.save_model` writes). Collective."""
        tensors: dict[str, torch.Tensor] = {}
        for bucket in self.full_weights(BUCKET_BYTES):
            if self.rank == 0:
                tensors.update((name, t.cpu()) for name, t in bucket)

        def write() -> None:
            dtype = next(iter(tensors.values())).dtype
            config = self.model.config.to_hf()
            set_config_dtype(config, dtype)
            write_hf_checkpoint(tensors, config, path, tokenizer_src, dtype=dtype)

        self._on_rank0(write)

    def _on_rank0(self, fn: Callable[[], None]) -> None:
        """Run `fn` on rank 0; every rank returns once it is done, or raises if it failed."""
        err: BaseException | None = None
        if self.rank == 0:
            try:
                fn()
            except BaseException as e:  # re-raised below, after telling the other ranks
                err = e
        msg = [None if err is None else f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(msg, src=0)
        if err is not None:
            raise err
        if msg[0] is not None:
            raise RuntimeError(f"trainer rank 0 failed: {msg[0]}")

    # ------------------------------------------------------------------ state and memory

    def save_state(self, folder: str | Path) -> None:
        """Write the optimizer state (sharded, `torch.distributed.checkpoint`) to ``folder/optimizer/``
        and the step count to ``folder/trainer_state.json``; under --bf16 the fp32 master weights go
        with the optimizer state (the HF ``model/`` folder holds them rounded to bf16). Collective."""
        folder = Path(folder)
        parked = self._parking.parked  # colocated: saved between an offload and the next onload
        self._parking.unpark()
        self._parking.ready()
        dcp.save(self._dcp_state(self.args.bf16), checkpoint_id=folder / OPTIMIZER_DIR)
        if parked:
            self.offload()
        info = {"step": self.step, "masters": bool(self.args.bf16), "world_size": self.world_size}
        self._on_rank0(lambda: (folder / STATE_FILE).write_text(json.dumps(info, indent=2) + "\n"))

    def load_state(self, folder: str | Path) -> None:
        """Restore what `save_state` wrote, on any number of ranks (DCP reshards). The weights come from
        building the trainer on ``<checkpoint>/model``. Collective."""
        folder = Path(folder)
        problem = state_problem(folder)
        if problem is not None:
            raise UsageError(f"cannot resume the trainer from {folder}: {problem}.")
        info = json.loads((folder / STATE_FILE).read_text())
        masters = bool(info.get("masters")) and self.args.bf16
        state = self._dcp_state(masters)
        dcp.load(state, checkpoint_id=folder / OPTIMIZER_DIR)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        if masters:
            set_model_state_dict(self.model, state["model"])
        self.step = int(info["step"])

    def _dcp_state(self, masters: bool) -> dict[str, Any]:
        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
        if masters:
            state["model"] = get_model_state_dict(self.model)
        return state

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("a sharded trainer saves its state collectively: use save_state(folder)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("a sharded trainer loads its state collectively: use load_state(folder)")

    def start_offload(self) -> None:
        """Start `offload`: gradients and gathered weights go now, and the AdamW state's copies to the host
        run on a side stream while the caller goes on (the colocated hand-over gathers the weights
        meanwhile); `offload` then frees that memory."""
        self.optimizer.zero_grad(set_to_none=True)
        _reshard(self.model)
        _reshard(self.ref_model)
        if self.device.type != "cuda" or self._parking.parked:  # on CPU host memory is the device's
            return
        states = [
            v.to_local() if isinstance(v, DTensor) else v
            for st in self.optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.device.type == "cuda"
        ]
        self._parking.park(states, wait=False)

    def offload(self) -> None:
        """Free the device for colocated rollout engines: AdamW state parked in (pinned, reused) host memory
        in place (`devices.Parking`), gradients and the root's gathered weights freed (a step starts with
        ``zero_grad(set_to_none=True)``, so a gradient left from the last step is never read again)."""
        self.start_offload()
        if self._parking.parked:
            self._parking.release()
            torch.cuda.empty_cache()

    def onload(self) -> None:
        """Bring back what `offload` parked. The copies are queued on a side stream and only the optimizer
        step waits for them (`_clip_grad_norm`), so they overlap the step's forward and backward."""
        self._parking.unpark(wait=False)


def state_problem(folder: str | Path) -> str | None:
    """Why `ShardedTrainer.load_state` cannot read ``folder``, naming the file; None if it can. Reads the
    JSON file and the DCP metadata, and checks that every file the metadata names is there and long
    enough (a truncated copy)."""
    folder = Path(folder)
    file = folder / STATE_FILE
    if not file.is_file():
        return f"{STATE_FILE} is missing"
    try:
        info = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{STATE_FILE} is truncated or corrupt (not valid JSON)"
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        return f"{STATE_FILE} is truncated or corrupt (not the expected object)"
    opt = folder / OPTIMIZER_DIR
    if not (opt / ".metadata").is_file():
        return f"{OPTIMIZER_DIR}/.metadata is missing"
    try:
        meta = dcp.FileSystemReader(str(opt)).read_metadata()
    except Exception as err:  # pickle and torch report a damaged file in various ways
        return f"{OPTIMIZER_DIR}/.metadata is truncated or corrupt ({' '.join(str(err).split())[:200]})"
    ends: dict[str, int] = {}
    for info_ in _storage_items(meta):
        ends[info_.relative_path] = max(ends.get(info_.relative_path, 0), info_.offset + info_.length)
    for rel, end in sorted(ends.items()):
        f = opt / rel
        if not f.is_file():
            return f"{OPTIMIZER_DIR}/{rel} is missing"
        if f.stat().st_size < end:
            return f"{OPTIMIZER_DIR}/{rel} is truncated ({f.stat().st_size} of at least {end} bytes)"
    return None


def _storage_items(meta: Any) -> Iterable[Any]:
    storage = getattr(meta, "storage_data", None)
    return storage.values() if isinstance(storage, dict) else []
