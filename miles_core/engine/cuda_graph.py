"""CUDA graphs for the engine's decode step: one graph per (batch bucket, key-length bucket).

A decode step of a small MoE model is hundreds of tiny kernels, so launch overhead, not bandwidth, bounds
it; replaying a captured graph removes that. Graph row b is cache slot b (the engine hands out the lowest
free slot first, so running sequences sit in rows 0..n-1); rows of free slots decode a dummy token at
position 0 of their own, unused slot, and are ignored. Inputs live in one static device buffer that the
engine fills with a single host-to-device copy per step. `DecodeGraphs(..., capture=False)` runs the same
static-shape forward eagerly, which is how the CPU tests check this path.
"""

from __future__ import annotations

import torch

from miles_core.model import CausalLM, KVCache, RoutingState

_MIN_KEYS = 64


def _bucket(n: int, limit: int, floor: int = 1) -> int:
    """Smallest power of two (times `floor`) >= n, capped at `limit`."""
    b = floor
    while b < n:
        b *= 2
    return min(b, limit)


class DecodeGraphs:
    """Captures and replays decode forwards over cache slots 0..B-1."""

    def __init__(self, model: CausalLM, cache: KVCache, *, capture: bool = True) -> None:
        self.model, self.cache = model, cache
        self.capture = capture and cache.k[0].is_cuda
        self.num_slots = cache.num_slots
        dev = cache.k[0].device
        # Row 0: input token per slot, row 1: its position; row 2 (not read by the graphs): the slots of
        # the running sequences in the engine's order, used to pick their logits rows after the replay.
        self.inputs = torch.zeros(3, self.num_slots, dtype=torch.long, device=dev)
        self._host = torch.zeros(3, self.num_slots, dtype=torch.long, pin_memory=self.capture)
        self._slots = torch.arange(self.num_slots, device=dev)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self.fingerprint = model_fingerprint(model)

    def buckets(self, rows: int, kv_len: int) -> tuple[int, int]:
        return _bucket(rows, self.num_slots), _bucket(kv_len, self.cache.max_len, _MIN_KEYS)

    def run(
        self, tokens: list[int], positions: list[int], slots: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for the sequences in `slots` (their last `tokens` at `positions`).

        Returns (logits [n, V] in the order of `slots`, routes long [n, num_moe_layers, k]); both are
        views into graph-owned memory, valid until the next call.
        """
        n = len(slots)
        rows, kv_len = self.buckets(max(slots) + 1, max(positions) + 1)
        host = self._host
        host[:, :rows].zero_()
        slot_t = torch.tensor(slots, dtype=torch.long)
        host[0, slot_t] = torch.tensor(tokens, dtype=torch.long)
        host[1, slot_t] = torch.tensor(positions, dtype=torch.long)
        host[2, :n] = slot_t
        self.inputs[:, :rows].copy_(host[:, :rows], non_blocking=self.capture)
        logits, routes = self._get(rows, kv_len)()
        pick = self.inputs[2, :n]
        return logits[pick], routes[pick]

    def _get(self, rows: int, kv_len: int):
        key = (rows, kv_len)
        if key not in self._graphs:
            self._graphs[key] = self._build(rows, kv_len)
        return self._graphs[key]

    def _forward(self, rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        routing = RoutingState(record=True)
        out = self.model(
            self.inputs[0, :rows, None],
            position_ids=self.inputs[1, :rows, None],
            kv_cache=self.cache,
            cache_slots=self._slots[:rows],
            routing=routing,
            kv_len=kv_len,
            contiguous_slots=True,
        )
        if routing.used_topk:
            routes = torch.stack([t[:, 0] for t in routing.used_topk], dim=1)
        else:
            routes = torch.zeros(rows, 0, 0, dtype=torch.long, device=out.logits.device)
        return out.logits[:, -1], routes

    def _build(self, rows: int, kv_len: int):
        if not self.capture:
            return lambda: self._forward(rows, kv_len)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(rows, kv_len)  # warm-up: lazy inits and autotuning stay out of the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self._forward(rows, kv_len)

        def replay() -> tuple[torch.Tensor, torch.Tensor]:
            graph.replay()
            return outputs

        return replay


def model_fingerprint(model: torch.nn.Module) -> tuple:
    """Addresses, shapes and dtypes of every parameter and buffer: a graph is valid only while the
    model still reads the same memory (a plugin that swaps modules or re-allocates weights changes it)."""
    return tuple(
        (name, t.data_ptr(), tuple(t.shape), t.dtype)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    )
