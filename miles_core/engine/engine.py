"""The built-in rollout engine: continuous batching over a preallocated KV cache.

Callers `await engine.generate(input_ids, sampling_params)` once per sample; a scheduler task admits
waiting requests into free cache slots (prefilling each distinct prompt once and copying its cache to
the other samples of the group), runs one decode step for every running sequence, and resolves a
request as soon as its sequence stops, freeing the slot for the next one. Everything runs on the
caller's asyncio loop, so a custom generate function needs no threads.

On the static decode path (CUDA graphs, `static_decode`) the scheduler keeps one step in flight. Abort,
pause, weight updates and memory release run between steps (`control`), from any thread. Samples are
drawn with per-sequence keyed noise (`keyed_exponentials`), so they do not depend on the path, the batch
or this overlap.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from miles_core.engine.control import EngineControl
from miles_core.engine.cuda_graph import DecodeGraphs, HostCopies, model_fingerprint
from miles_core.engine.sampler import SamplingParams, sample_tokens
from miles_core.engine.sequence import (
    DecodeStrategy,
    EngineOutput,
    SequenceView,
    _Seq,
    eos_ids,
    filter_flags,
    graph_safe,
)
from miles_core.engine.static_decode import StaticDecode, _InFlight
from miles_core.model import CausalLM, KVCache, RoutingState, fused_moe, load_hf_tensors, set_fused_moe
from miles_core.types import RolloutOptions, UsageError


class Engine(EngineControl, StaticDecode):
    """Batched sampling with a KV cache; the rollout backend named ``torch``."""

    in_process = True  # decodes with the model the loop hands it

    def __init__(
        self,
        model: CausalLM,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 256,
        seed: int = 0,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # From the plugins' pre_rollout answers: record each token's experts; a decode strategy.
        self.capture_routes = False
        self.decode_strategy: DecodeStrategy | None = None
        self.weight_version = 0
        self._keys = random.Random(seed)  # per-sequence sampling keys, drawn in admission order
        self.stats = dict(prefills=0, prefill_tokens=0, decode_steps=0, generated_tokens=0, busy_s=0.0)
        self.admit_quiet_s, self.admit_window_s = 0.005, 0.03  # admission waits for a burst (`_arriving`)
        # Decode through CUDA graphs (default on CUDA) unless a module of the model declares
        # `cuda_graph_safe = False`; outputs are the same as the eager path's. `compile` compiles the
        # static decode step with torch.compile (fuses the small kernels; a compile per batch/key-length
        # bucket on first use) and needs the static step, so it turns graphs on too.
        self._want_graphs = (self.device.type == "cuda" if cuda_graph is None else cuda_graph) or compile
        self._graph_safe = graph_safe(model)
        self.compile = compile
        self._graphs: DecodeGraphs | None = None
        self._inflight: _InFlight | None = None
        self._host_copies: HostCopies | None = None
        self._eos = eos_ids(model, tokenizer)
        self._cache: KVCache | None = None
        self._slot_params: torch.Tensor | None = None  # float32 [3, slots]: temperature, top_p, top_k
        self._free: list[int] = []
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._task: asyncio.Task | None = None
        self._init_control()

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: CausalLM, tokenizer: Any) -> Engine:
        """The engine a run's flags ask for: batch size, seed, CUDA graphs, compile, fused MoE kernels."""
        device = next(model.parameters()).device
        n = (args.rollout_batch_size or 0) * args.n_samples_per_prompt
        engine = cls(
            model,
            tokenizer,
            max_batch_size=args.rollout_max_batch_size or max(n, 1),
            seed=args.rollout_seed,
            cuda_graph=args.rollout_cuda_graph and device.type == "cuda",
            compile=args.rollout_compile,
        )
        usable = fused_moe.available(next(model.parameters()))
        if args.rollout_fused_moe and not usable:
            raise UsageError(
                "--rollout-fused-moe runs Triton kernels on CUDA: install triton and roll out on a "
                "GPU, or drop the flag."
            )
        cfg = model.config
        if args.rollout_fused_moe is not False and usable and cfg.num_experts:
            # Decode steps with a few rows an expert use the kernels; larger batches (prefill, big
            # decode batches) keep the grouped GEMMs.
            rows = fused_moe.default_max_rows(cfg.num_experts, cfg.num_experts_per_tok, engine.max_batch_size)
            set_fused_moe(model, rows)
        return engine

    # ---------------------------------------------------------------- public interface

    @property
    def cuda_graph(self) -> bool:
        """Whether decode steps run the static-shape step (captured in CUDA graphs on CUDA): asked for,
        and every module of the model can run inside a graph."""
        return self._want_graphs and self._graph_safe

    @cuda_graph.setter
    def cuda_graph(self, value: bool) -> None:
        self._want_graphs = bool(value)

    @property
    def kv_cache(self) -> KVCache | None:
        """The KV cache of the running sequences (row = slot), allocated on first use; a decode strategy
        writes its forwards here and may size its own cache after it."""
        return self._cache

    def set_rollout_options(self, options: RolloutOptions) -> None:
        """Apply the merged ``pre_rollout`` answers of the plugins before a rollout."""
        self.capture_routes = options.capture_routes
        self.decode_strategy = options.decode_strategy

    def reseed(self, seed: int) -> None:
        """Reset the per-sequence sampling keys (the loop reseeds per rollout so resumed runs repeat)."""
        self._keys.seed(seed)

    @property
    def generated_tokens(self) -> int:
        """Tokens generated since the engine was built (the rollout's tokens/s come from it)."""
        return self.stats["generated_tokens"]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy new weights (HF names) into the engine's model in place and bump the version.

        Safe while requests run (from any thread): it happens between two decode steps, and the tokens
        sampled after it are labelled ``version``."""

        def load() -> None:
            if self._parking.parked:  # released: the weights take their memory back to be written
                self._parking.unpark()
            load_hf_tensors(self.model, named_tensors)
            self.weight_version = version

        self._between_steps(load)

    def metrics(self) -> dict[str, float]:
        """Backend statistics for the rollout metrics (``rollout/<name>``); the in-process engine has
        none beyond what the rollout measures itself."""
        return {}

    def close(self) -> None:
        """Nothing to stop: the engine lives and dies with the process (an HTTP backend stops its
        servers here)."""

    @property
    def num_running(self) -> int:
        """Requests decoding now."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests waiting for a free slot (or for ``continue_generation``)."""
        return len(self._waiting)

    @torch.no_grad()
    async def generate(
        self, input_ids: list[int], sampling_params: dict | SamplingParams, rid: str | None = None
    ) -> EngineOutput:
        """Sample a continuation of ``input_ids``; returns when this sequence stops (or is aborted:
        ``abort(rid)``, finish reason ``abort``, with the tokens generated so far)."""
        params = (
            sampling_params
            if isinstance(sampling_params, SamplingParams)
            else SamplingParams.from_dict(sampling_params)
        )
        if not input_ids:
            raise ValueError("generate() needs at least one prompt token.")
        loop = asyncio.get_running_loop()
        seq = _Seq(prompt=list(input_ids), params=params, future=loop.create_future(), rid=rid)
        with self._lock:
            if self._alive and self._loop is not loop:
                raise RuntimeError("the engine is generating on another event loop; call it from that one.")
            self._waiting.append(seq)
            if not self._alive:
                self._alive, self._loop = True, loop
                self._task = loop.create_task(self._run())
        return await seq.future

    def generate_batch(
        self, prompts: list[list[int]], sampling_params: dict | SamplingParams
    ) -> list[EngineOutput]:
        """Synchronous helper: generate for every prompt with the same parameters."""

        async def _all():
            return await asyncio.gather(*(self.generate(p, sampling_params) for p in prompts))

        return asyncio.run(_all())

    # ---------------------------------------------------------------- scheduler

    async def _run(self) -> None:
        self._graph_safe = graph_safe(self.model)  # plugins may have swapped modules since
        if self._graphs is not None and self._graphs.fingerprint != model_fingerprint(self.model):
            self._graphs = None
        try:
            while True:
                with self._lock:
                    if not (self._waiting or self._running or self._inflight is not None or self._calls):
                        self._alive = False
                        break
                    # The whole step holds the lock: a control call from a thread that finds this loop
                    # stopped (between two run_until_complete calls) runs itself instead of queueing.
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        self._run_calls()
                        paused = self.paused
                        if paused:
                            self._drain()
                        else:
                            if not self._arriving():
                                if self._inflight is not None and self._admissible():
                                    self._drain()  # admission changes the batch: settle the step in flight
                                self._admit()
                            if self._running:
                                self._decode_step()
                            else:
                                self._drain()
                    self.stats["busy_s"] += time.perf_counter() - t0  # host time in steps (not awaiting)
                await asyncio.sleep(0.002 if paused else 0)
        except BaseException as e:  # surface the error to every waiting caller instead of hanging
            with self._lock:
                self._alive = False
            self._fail_calls(e)
            for seq in self._waiting + self._running:
                if not seq.future.done():
                    seq.future.set_exception(e)
            self._waiting.clear()
            self._running.clear()
            self._inflight = None
            self._free = list(range(self._cache.num_slots)) if self._cache is not None else []
            self._graphs = None
            raise
        finally:
            # Pinned buffers go back while CUDA is certainly alive (freeing one records a CUDA event;
            # an engine collected at interpreter exit would do that after CUDA shut down).
            if self._inflight is None:
                self._host_copies = None

    def _arriving(self) -> bool:
        """Whether a burst of requests is still reaching the queue: the newest came less than
        ``admit_quiet_s`` ago and the oldest has waited less than ``admit_window_s``. A burst (64 HTTP
        clients at once) arrives over several loop turns; admission waits for the rest of it, so it is
        prefilled in one forward rather than in one launch-bound prefill per turn (3 prefills cost 0.1 s
        on an H100). Running sequences decode meanwhile."""
        t, w = time.perf_counter(), self._waiting
        return bool(w) and t - w[-1].arrived < self.admit_quiet_s and t - w[0].arrived < self.admit_window_s

    def _ensure_cache(self, need_len: int) -> None:
        if self._cache is not None and need_len <= self._cache.max_len:
            return
        if self._running:  # grow only when idle; admission waits until then
            return
        max_len = max(64, -(-need_len // 64) * 64)
        self._cache = KVCache(self.model.config, self.max_batch_size, max_len, self.dtype, self.device)
        self._free = list(range(self.max_batch_size))  # a heap: the lowest free slot is taken first
        self._graphs = None
        self._slot_params = torch.ones(3, self.max_batch_size, dtype=torch.float32, device=self.device)

    def _admissible(self) -> bool:
        """Whether `_admit` would take the first waiting request now (a free slot, and a cache long
        enough, or none yet / an idle engine that may grow it)."""
        if not (self._waiting and self._free):
            return False
        return self._cache is None or self._fits(self._waiting[0]) or not self._running

    def _fits(self, seq: _Seq) -> bool:
        """Whether the cache holds `seq`'s prompt and every token it may generate."""
        return len(seq.prompt) + seq.params.max_new_tokens <= self._cache.max_len

    def _admit(self) -> None:
        if not self._waiting:
            return
        need = max(len(s.prompt) + s.params.max_new_tokens for s in self._waiting)
        self._ensure_cache(need)
        admitted = []
        while self._waiting and self._free:
            seq = self._waiting[0]
            if not self._fits(seq):
                break
            seq.slot = heapq.heappop(self._free)
            seed = seq.params.sampling_seed
            seq.key = self._keys.getrandbits(31) if seed is None else int(seed) & 0x7FFFFFFF
            admitted.append(self._waiting.pop(0))
        if admitted:
            # Per-slot sampling parameters live on the device: written once here, gathered per step.
            vals = [[s.params.temperature, s.params.top_p, float(s.params.top_k)] for s in admitted]
            slots = torch.tensor([s.slot for s in admitted], device=self.device)
            self._slot_params[:, slots] = torch.tensor(vals, dtype=torch.float32).T.to(self.device)
            self._prefill(admitted)

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prefill each distinct prompt once, share its cache with the group, sample first tokens."""
        groups: dict[tuple[int, ...], list[_Seq]] = {}
        for s in seqs:
            groups.setdefault(tuple(s.prompt), []).append(s)
        heads = [g[0] for g in groups.values()]
        host_lens = [len(h.prompt) for h in heads]
        width = max(host_lens)
        ids = torch.zeros(len(heads), width, dtype=torch.long)
        for i, h in enumerate(heads):
            ids[i, : len(h.prompt)] = torch.tensor(h.prompt)
        ids = ids.to(self.device)
        lens = torch.tensor(host_lens, device=self.device)
        pos = torch.arange(width, device=self.device).expand(len(heads), width)
        slots = torch.tensor([h.slot for h in heads], device=self.device)
        routing = RoutingState(record=True) if self.capture_routes else None
        out = self.model(
            ids, position_ids=pos, kv_cache=self._cache, cache_slots=slots, routing=routing, kv_len=width,
            compute_logits=False,
        )  # fmt: skip
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += sum(host_lens)
        # Only each prompt's last position is sampled from: project just those rows onto the vocab.
        last = out.project(torch.arange(len(heads), device=self.device), lens - 1)
        all_routes = self._stack_routes(routing)  # one device-to-host copy for every prompt
        rows, row_index = [], []
        for i, group in enumerate(groups.values()):
            others = [s.slot for s in group[1:]]
            if others:
                self._cache.copy_slots(
                    group[0].slot, torch.tensor(others, device=self.device), len(group[0].prompt)
                )
            for s in group:
                if all_routes is not None:
                    s.routes.append(all_routes[i, : len(group[0].prompt)])
                rows.append(s)
                row_index.append(i)
        self._running.extend(rows)
        self._sample(rows, last[torch.tensor(row_index, device=self.device)])

    def _decode_step(self) -> None:
        seqs = self._running
        if self.decode_strategy is not None:
            self.decode_strategy.decode_step(self, [s.view for s in seqs])
            self.stats["decode_steps"] += 1
            self._retire()
            return
        if self.cuda_graph:  # on CPU this runs the same static-shape step without capturing it
            self._static_step()
            return
        tokens = [s.out[-1] for s in seqs]
        positions = [len(s.prompt) + len(s.out) - 1 for s in seqs]
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        routing = RoutingState(record=True) if self.capture_routes else None
        out = self.model(
            ids, position_ids=pos, kv_cache=self._cache, cache_slots=slots, routing=routing,
            kv_len=max(positions) + 1,
        )  # fmt: skip
        logits = out.logits[:, -1]
        routes = None if routing is None else torch.stack([t[:, 0] for t in routing.used_topk], dim=1)
        self.stats["decode_steps"] += 1
        self._sample(list(seqs), logits, routes)

    def _stack_routes(self, routing: RoutingState | None) -> np.ndarray | None:
        """int32 [B, T, num_moe_layers, k] on the host, in one copy."""
        if routing is None or not routing.used_topk:
            return None
        return torch.stack(routing.used_topk, dim=2).to(torch.int32).cpu().numpy()

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, routes: torch.Tensor | None = None) -> None:
        """Sample one token per sequence, with one host sync for tokens and log-probs together."""
        slots = torch.tensor([s.slot for s in seqs], device=self.device)
        temp, top_p, top_k = self._slot_params[:, slots]
        keys = torch.tensor([[s.key, len(s.prompt) + len(s.out)] for s in seqs], device=self.device)
        tokens, logps = sample_tokens(
            logits, temp, top_p, top_k.long(), None, noise_key=(keys[:, 0], keys[:, 1]), **filter_flags(seqs)
        )
        host = torch.stack([tokens.double(), logps.double()]).cpu()
        host_routes = None
        if routes is not None and self.capture_routes:
            host_routes = routes.to(torch.int32).cpu().numpy()
        toks, lps = host[0].long().tolist(), host[1].tolist()
        for i, s in enumerate(seqs):
            self._accept(s, [toks[i]], [lps[i]], None if host_routes is None else host_routes[i : i + 1])
        self._retire()

    def accept(
        self,
        seq: SequenceView,
        tokens: list[int],
        log_probs: list[float],
        routes: np.ndarray | None = None,
    ) -> int:
        """Append sampled tokens to a running sequence, stopping at the first that finishes it.

        The decode strategy's way to advance a sequence. Returns how many tokens were taken; those after
        a stop are dropped (their cache entries are simply overwritten later).

        :param routes: int32 ``[>= len(tokens), num_moe_layers, topk]``: row ``i`` holds the experts of
            the token fed at the forward that sampled ``tokens[i]``; kept (copied) only while
            ``capture_routes`` is on, for the tokens taken.
        """
        return self._accept(seq._seq, tokens, log_probs, routes)

    def _accept(self, s: _Seq, tokens: list[int], log_probs: list[float], routes: np.ndarray | None) -> int:
        taken = 0
        for tok, lp in zip(tokens, log_probs):
            s.out.append(tok)
            s.logps.append(lp)
            s.versions.append(self.weight_version)
            self.stats["generated_tokens"] += 1
            taken += 1
            s.finish = s.finish_reason(tok, self._eos, self.tokenizer)
            if s.finish is not None:
                break
        if routes is not None and self.capture_routes:
            s.routes.append(np.array(routes[:taken], dtype=np.int32))
        return taken

    def _retire(self) -> None:
        still = []
        for s in self._running:
            if s.finish is None:
                still.append(s)
                continue
            heapq.heappush(self._free, s.slot)
            info = self.decode_strategy.finished(s.view) if self.decode_strategy is not None else {}
            if not s.future.done():
                s.future.set_result(s.result(self.weight_version, info))
        self._running = still
