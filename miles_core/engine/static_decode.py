"""The engine's static-shape decode path (CUDA graphs on CUDA): one step stays in flight.

`StaticDecode` is a mixin of `Engine`: it launches step t+1 (whose inputs the device already holds)
before it reads step t's tokens on the host, so the host's bookkeeping overlaps the GPU. A sequence that
stops at step t has one more token computed at step t+1, which is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from miles_core.engine.cuda_graph import DecodeGraphs, HostCopies
from miles_core.engine.sequence import _Seq, filter_flags


@dataclass
class _InFlight:
    """A launched static decode step whose tokens the host has not read yet."""

    seqs: list[_Seq]
    host: torch.Tensor  # float64 [rows, 2]: token, log-prob per row (filled asynchronously)
    routes: torch.Tensor | None  # int32 [rows, L, k] on the host
    event: Any  # torch.cuda.Event, or None on CPU (the copies were synchronous)


class StaticDecode:
    """The static decode step, its host copies and the step in flight (state lives on `Engine`)."""

    @property
    def _graphs(self) -> DecodeGraphs | None:
        return self.__dict__.get("_graphs_held")

    @_graphs.setter
    def _graphs(self, graphs: DecodeGraphs | None) -> None:
        """Replacing the graphs (None: dropping them) closes the old ones, so their memory goes now."""
        old = self.__dict__.get("_graphs_held")
        if old is not None and old is not graphs:
            old.close()
        self.__dict__["_graphs_held"] = graphs

    def _decode_graphs(self) -> DecodeGraphs:
        g = self._graphs
        if g is None or g.cache is not self._cache or g.compile != self.compile:
            g = self._graphs = DecodeGraphs(self.model, self._cache, self._slot_params, compile=self.compile)
            self._host_copies = None
        return g

    def warm_up(self, max_len: int) -> int:
        """Allocate the KV cache for ``max_len`` positions and, on the static path, capture (or compile)
        the decode step for every batch-size bucket now, as a server does before it takes requests; the
        first requests then run no capture. Returns how many steps were built. Call while idle."""
        if self._running or self._waiting:
            raise RuntimeError("warm_up() runs before requests arrive.")
        self._ensure_cache(max_len)
        if not self.cuda_graph:
            return 0
        built = 0
        with torch.inference_mode():
            g = self._decode_graphs()
            g.load([], [], [], [])  # every row idle: the steps below advance nothing
            rows = 1
            while True:
                g.step(*g.buckets(rows, self._cache.max_len))
                built += 1
                if rows >= self._cache.num_slots:
                    break
                rows = min(2 * rows, self._cache.num_slots)
        return built

    def _static_step(self) -> None:
        """Launch one static decode step, then settle the previous one (one step stays in flight)."""
        g = self._decode_graphs()
        seqs = list(self._running)
        prev, self._inflight = self._inflight, None
        if prev is None:  # the batch changed: give the device the host's view of every running row
            for s in seqs:
                s.pos = len(s.prompt) + len(s.out) - 1
            g.load([s.out[-1] for s in seqs], [s.pos for s in seqs], [s.key for s in seqs],
                   [s.slot for s in seqs])  # fmt: skip
        else:  # the device already fed each row's sampled token forward
            for s in seqs:
                s.pos += 1
        rows, kv_len = g.buckets(max(s.slot for s in seqs) + 1, max(s.pos for s in seqs) + 1)
        tokens, logps, routes = g.step(rows, kv_len, **filter_flags(seqs))
        self.stats["decode_steps"] += 1
        self._inflight = self._copy_out(seqs, tokens, logps, routes)
        if prev is not None:
            self._settle(prev)

    def _copy_out(self, seqs, tokens, logps, routes) -> _InFlight:
        """Start copying a step's outputs into one of two host buffers (no sync)."""
        if self._host_copies is None:
            self._host_copies = HostCopies(self._cache.num_slots, self.device)
        want_routes = self.capture_routes and routes.numel() > 0
        host, host_routes, event = self._host_copies.copy(
            torch.stack([tokens.double(), logps.double()], dim=1), routes if want_routes else None
        )
        return _InFlight(seqs, host, host_routes, event)

    def _settle(self, step: _InFlight) -> None:
        """Wait for a launched step's outputs and hand its tokens to the sequences that still run."""
        if step.event is not None:
            step.event.synchronize()
        toks, lps = step.host[:, 0].long().tolist(), step.host[:, 1].tolist()
        for s in step.seqs:
            if s.finish is not None:
                continue  # stopped at the step before: this token was computed past the end, drop it
            routes = None if step.routes is None else step.routes[s.slot : s.slot + 1].numpy()
            self._accept(s, [toks[s.slot]], [lps[s.slot]], routes)
        done = [s.slot for s in self._running if s.finish is not None]
        self._retire()
        if done and self._inflight is not None:
            self._graphs.deactivate(done)  # the step in flight advanced them; stop them there

    def _drain(self) -> None:
        """Settle the step in flight, if any."""
        step, self._inflight = self._inflight, None
        if step is not None:
            self._settle(step)
