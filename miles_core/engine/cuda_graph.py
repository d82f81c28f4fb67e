"""The engine's static-shape decode step: forward, sampling and the next step's inputs in one graph.

A decode step of a small MoE model is hundreds of tiny kernels, so launch overhead, not bandwidth, bounds
it. `DecodeGraphs` runs one step over cache slots 0..B-1 (graph row b is cache slot b; the engine hands
out the lowest free slot first, so running sequences sit in rows 0..n-1) with shapes fixed per
(batch bucket, key-length bucket), which lets it

- capture the step in a CUDA graph and replay it (`capture`, on CUDA),
- compile it with `torch.compile` first (`compile`), which fuses the norms, rope, router and sampler into
  a few kernels (on CPU too, where it removes most per-op dispatch).

The step keeps its state on the device: the token each row feeds next, its position, its sampling key
and whether the row is active. Sampling happens inside the step (with noise keyed per sequence,
`keyed_exponentials`), and the step writes each active row's sampled token and next position back into
that state, so the engine can launch step t+1 before it has looked at step t's tokens on the host. Rows
of free slots decode a dummy token at a fixed position of their own, unused slot, and are ignored.
`DecodeGraphs(..., capture=False)` runs the same static-shape step eagerly, which is how the CPU tests
check this path.
"""

from __future__ import annotations

import gc

import torch

from miles_core.devices import to_device
from miles_core.engine.sampler import sample_tokens
from miles_core.model import CausalLM, KVCache, RoutingState, decode_attention
from miles_core.model.layers import fuse_qkv

_MIN_KEYS = 64
TOKEN, POSITION, KEY, ACTIVE = range(4)  # rows of DecodeGraphs.state


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """Smallest power of two (times `floor`) >= n, capped at `limit`."""
    b = floor
    while b < n:
        b *= 2
    return min(b, limit)


def compile_step(fn, device: torch.device):
    """``torch.compile`` of a static-shape step function, set up as the engine's decode step is."""
    from torch._dynamo import config as dynamo_config

    # One compiled graph per bucket (a handful in practice), each specialised to its shapes.
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 128)
    # Fused kernels round bf16 intermediates where the eager ops do, so compiled decoding keeps
    # the eager path's tokens (greedy) and log-probs.
    options = {"emulate_precision_casts": True}
    if device.type == "cpu":
        # On CPU the generated wrapper is C++ too (~15% off a small model's step; no CUDA graph there
        # to hide the Python wrapper's per-kernel calls).
        options["cpp_wrapper"] = True
    return torch.compile(fn, dynamic=False, options=options)


def capture_step(fn, args: tuple, restore: list[torch.Tensor], pool):
    """Capture ``fn(*args)`` in a CUDA graph; returns a function that replays it and returns its outputs.

    ``fn`` runs twice first on a side stream (compilation, lazy inits and autotuning stay out of the
    graph). Those runs are real, so every tensor in ``restore`` (state the step advances) is put back
    after each; whatever else they wrote (K/V at the rows' current positions) the replay rewrites.
    ``pool`` is a ``torch.cuda.graph_pool_handle()`` shared by one owner's graphs.
    """
    saved = [t.clone() for t in restore]

    def put_back():
        for t, s in zip(restore, saved):
            t.copy_(s)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            put_back()
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    put_back()  # capturing runs nothing
    graph = torch.cuda.CUDAGraph()
    # A garbage collection during capture could free another, unreachable graph (an old engine's), and
    # destroying a graph is not allowed while a stream captures: it would invalidate this capture. (No
    # collection before it either: a full one takes 0.1-0.3 s in a server's heap, once per capture.)
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            outputs = fn(*args)
    finally:
        gc.enable()

    def replay():
        graph.replay()
        return outputs

    return replay


class DecodeGraphs:
    """Captured (or compiled, or plain static-shape) decode steps over cache slots 0..B-1."""

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        slot_params: torch.Tensor | None = None,
        *,
        capture: bool = True,
        compile: bool = False,
    ) -> None:
        self.model, self.cache = model, cache
        self.capture = capture and cache.k[0].is_cuda
        self.compile = compile
        self.num_slots = cache.num_slots
        dev = cache.k[0].device
        # float32 [3, slots]: temperature, top_p, top_k of the sequence in each slot (the engine's).
        self.slot_params = (
            slot_params if slot_params is not None else torch.ones(3, self.num_slots, device=dev)
        )
        self.state = torch.zeros(4, self.num_slots, dtype=torch.long, device=dev)
        self._host = torch.zeros(4, self.num_slots, dtype=torch.long, pin_memory=self.capture)
        self._slots = torch.arange(self.num_slots, device=dev)
        self._graphs: dict[tuple, object] = {}
        self._pool = None
        self._step_fn = self._step
        if compile:
            self._step_fn = compile_step(self._step, dev)
        fuse_qkv(model)  # one q/k/v GEMM per layer in the step (views: the weights stay where they are)
        self.fingerprint = model_fingerprint(model)
        # With the decode attention kernel each row reads its own keys: the step does not depend on
        # the key-length bucket, so one bucket (the whole cache) serves every length, and a compiled
        # step compiles once per row bucket instead of once per (row, key-length) pair.
        self.per_row_keys = decode_attention.use_for_decode(cache.k[0], model.config.head_dim)

    def close(self) -> None:
        """Drop the captured steps, their memory pool and the step function now. The step function (a
        bound method) makes this object a reference cycle, which alone would keep the graphs and the KV
        cache on the device until the cyclic GC next runs; the engine closes graphs it replaces."""
        self._graphs.clear()
        self._pool = None
        self._step_fn = None

    def buckets(self, rows: int, kv_len: int) -> tuple[int, int]:
        if self.per_row_keys:
            return bucket(rows, self.num_slots), self.cache.max_len
        return bucket(rows, self.num_slots), bucket(kv_len, self.cache.max_len, _MIN_KEYS)

    def load(self, tokens: list[int], positions: list[int], keys: list[int], slots: list[int]) -> None:
        """Set the whole device state: these slots feed `tokens` at `positions`; every other row idles."""
        host = self._host
        host.zero_()
        slot_t = torch.tensor(slots, dtype=torch.long)
        host[TOKEN, slot_t] = torch.tensor(tokens, dtype=torch.long)
        host[POSITION, slot_t] = torch.tensor(positions, dtype=torch.long)
        host[KEY, slot_t] = torch.tensor(keys, dtype=torch.long)
        host[ACTIVE, slot_t] = 1
        self.state.copy_(host, non_blocking=self.capture)

    def deactivate(self, slots: list[int]) -> None:
        """Stop advancing these rows (their sequences finished while a later step was in flight)."""
        # Not waiting for the step in flight to finish.
        self.state[ACTIVE, to_device(torch.tensor(slots, dtype=torch.long), self.state.device)] = 0

    def step(
        self, rows: int, kv_len: int, use_top_k: bool = False, use_top_p: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run one decode step over rows 0..rows-1 (`buckets` gives valid sizes) and advance the state.

        Returns (tokens long [rows], log-probs float32 [rows], routes long [rows, num_moe_layers, k]),
        views into step-owned memory that the next step overwrites.
        """
        key = (rows, kv_len, use_top_k, use_top_p)
        if key not in self._graphs:
            self._graphs[key] = self._build(*key)
        return self._graphs[key]()

    def run(
        self, tokens: list[int], positions: list[int], slots: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for the sequences in `slots` (their last `tokens` at `positions`), without keeping
        what it samples: (logits [n, V] in the order of `slots`, routes long [n, num_moe_layers, k])."""
        rows, kv_len = self.buckets(max(slots) + 1, max(positions) + 1)
        self.load(tokens, positions, [0] * len(slots), slots)
        logits, routes = self._forward(rows, kv_len)
        pick = torch.tensor(slots, device=logits.device)
        return logits[pick], routes[pick]

    def _forward(self, rows: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        routing = RoutingState(record=True)
        out = self.model(
            self.state[TOKEN, :rows, None],
            position_ids=self.state[POSITION, :rows, None],
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

    def _step(self, rows: int, kv_len: int, use_top_k: bool, use_top_p: bool):
        logits, routes = self._forward(rows, kv_len)
        st = self.state[:, :rows]
        temp, top_p, top_k = self.slot_params[:, :rows]
        pos, active = st[POSITION], st[ACTIVE]
        tokens, logps = sample_tokens(
            logits, temp, top_p, top_k.long(), None, use_top_k=use_top_k, use_top_p=use_top_p,
            noise_key=(st[KEY], pos + 1),  # keyed by the index of the token being drawn
        )  # fmt: skip
        # The next step feeds each active row's token one position later; idle rows stay where they are.
        st[TOKEN].copy_(torch.where(active > 0, tokens, st[TOKEN]))
        st[POSITION].copy_(pos + active)
        return tokens, logps, routes

    def _build(self, rows: int, kv_len: int, use_top_k: bool, use_top_p: bool):
        args = (rows, kv_len, use_top_k, use_top_p)
        if not self.capture:
            return lambda: self._step_fn(*args)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return capture_step(self._step_fn, args, [self.state], self._pool)


class HostCopies:
    """Two alternating host buffers (pinned on CUDA) that a launched step's outputs are copied into
    without waiting for the step: the buffer of the step still in flight is never overwritten.

    :param rows: the most rows a step returns (the cache's slots).
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.cuda = rows, device.type == "cuda"
        self._bufs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._shapes: tuple | None = None

    def copy(self, out: torch.Tensor, routes: torch.Tensor | None = None):
        """Start copying ``out`` (as float64) and ``routes`` (as int32, optional) to the host.

        :returns: ``(host out, host routes or None, event or None)``: views of the first ``len(out)`` rows,
            valid once the event (recorded after the copies, on CUDA) has completed.
        """
        shapes = (tuple(out.shape[1:]), None if routes is None else tuple(routes.shape[1:]))
        if shapes != self._shapes:
            self._bufs = [
                (
                    torch.zeros((self.rows, *shapes[0]), dtype=torch.float64, pin_memory=self.cuda),
                    None if routes is None
                    else torch.zeros((self.rows, *shapes[1]), dtype=torch.int32, pin_memory=self.cuda),
                )
                for _ in range(2)
            ]  # fmt: skip
            self._shapes = shapes
        self._bufs.reverse()
        host, host_routes = self._bufs[0]
        n = out.shape[0]
        # Leading-dim slices stay contiguous: a non-contiguous pinned target would make the copy go
        # through a pageable temporary, which waits for the step.
        host = host[:n]
        host.copy_(out, non_blocking=self.cuda)
        if host_routes is not None:
            host_routes = host_routes[:n]
            host_routes.copy_(routes.to(torch.int32), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return host, host_routes, event


def model_fingerprint(model: torch.nn.Module) -> tuple:
    """Addresses, shapes and dtypes of every parameter and buffer: a graph is valid only while the
    model still reads the same memory (a plugin that swaps modules or re-allocates weights changes it)."""
    return tuple(
        (name, t.data_ptr(), tuple(t.shape), t.dtype)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    )
