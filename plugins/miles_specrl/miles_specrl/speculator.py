"""Speculative decoding for the built-in engine: draft k tokens, verify them in one target forward.

The engine's decode strategy (``miles_core.api.DecodeStrategy``), returned by the plugin's
``pre_rollout``: it sees each running sequence through a read-only ``SequenceView`` and appends tokens
with ``engine.accept``. Each decode step drafts up to k tokens per running sequence (with the
model's MTP depth reused autoregressively, EAGLE-style, or with a separate small draft model), runs ONE
target forward over ``[last token, d_1..d_k]`` through the engine's KV cache, and accepts by rejection
sampling (Leviathan et al., 2023), so every token follows the target's sampling distribution exactly at
any temperature / top-p / top-k; the reported log-probs are the target's (tempered, as the sampler's).

The whole step (draft, verify, accept) has static shapes over cache slots 0..rows-1, as the engine's own
decode step does (`miles_core.engine.cuda_graph`): on CUDA it is captured in a CUDA graph per row bucket
(and compiled first with the engine's ``compile`` flag); elsewhere the same step runs eagerly. Its
random choices use noise keyed by (sequence key, token position, stream), so a sequence's samples do not
depend on its batch, its bucket or on whether the step was captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from miles_core.api import (
    HostCopies,
    RoutingState,
    bucket,
    capture_step,
    compile_step,
    filter_flags,
    fuse_qkv,
    model_fingerprint,
    tempered_logits,
)
from miles_specrl.drafters import ACCEPT_STREAM, RESIDUAL_STREAM, Drafter, keyed_uniform, race


def target_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    use_top_k: bool | None = None,
    use_top_p: bool | None = None,
) -> torch.Tensor:
    """The distribution `miles_core.engine.sample_tokens` samples from, per row of ``logits`` [N, V].

    Greedy rows (temperature <= 0) become one-hot at the argmax. ``use_top_k`` / ``use_top_p`` as there.
    """
    _, masked, greedy = tempered_logits(logits, temperature, top_p, top_k, use_top_k, use_top_p)
    return _probs(logits, masked, greedy)


def _probs(logits: torch.Tensor, masked: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """softmax of `tempered_logits`' masked logits; one-hot at the argmax on greedy rows."""
    probs = torch.softmax(masked, dim=-1)
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return torch.where(greedy.unsqueeze(-1), onehot, probs)


@dataclass
class SeqStats:
    steps: int = 0  # verify forwards
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens appended by speculative steps (accepted + one per step, before stops)

    def info(self) -> dict[str, float]:
        return {
            "spec_accept_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "spec_accept_length": self.emitted / self.steps if self.steps else 0.0,
            "spec_verify_steps": float(self.steps),
            "spec_draft_tokens": float(self.drafted),
        }


@dataclass
class _State:
    stats: SeqStats = field(default_factory=SeqStats)
    seq: Any = None  # keeps the engine's sequence alive while its id() keys this state


class Speculator:
    """A decode strategy: one speculative decode step for every running sequence.

    :param drafter: proposes draft tokens (`miles_specrl.drafters.MTPDrafter` or ``ModelDrafter``).
    :param num_steps: k, draft tokens per step (``--sglang-speculative-num-steps``).
    :param verifier: ``"rejection"``; ``"accept_all"`` is a deliberately wrong verifier for tests.
    """

    def __init__(self, drafter: Drafter, num_steps: int, verifier: str = "rejection") -> None:
        if num_steps < 1:
            raise ValueError(f"speculative decoding needs num_steps >= 1, got {num_steps}")
        self.drafter, self.k, self.verifier = drafter, num_steps, verifier
        self._states: dict[int, _State] = {}
        self._done: dict[int, dict[str, float]] = {}  # finished sequences' stats, until the engine asks
        self.totals = SeqStats()
        self._steps: SpecSteps | None = None
        self._inflight: _InFlight | None = None

    def prepare(self, engine: Any) -> None:
        """Get ready to decode for ``engine`` in a new rollout (fresh statistics)."""
        self.drafter.attach(engine, self.k + 1)
        self._inflight = None
        self._states.clear()
        self._done.clear()
        self.totals = SeqStats()
        self.drafter.reset()

    def finished(self, seq: Any) -> dict[str, float]:
        """The statistics of a sequence that stopped (empty if it never reached a speculative step)."""
        self._states.pop(id(seq), None)  # an aborted sequence retires without settling here
        return self._done.pop(id(seq), {})

    # ------------------------------------------------------------------ the decode step

    def _runner(self, engine: Any, weights: bool) -> SpecSteps:
        """The steps for this engine, re-made when its cache, flags or (checked only with ``weights``:
        walking every parameter costs host time a step cannot spare) weight memory changed."""
        remade = self.drafter.sync(engine)
        capture = bool(engine.cuda_graph) and engine.device.type == "cuda"
        r = self._steps
        if (
            remade or r is None or r.engine is not engine or r.cache is not engine.kv_cache
            or r.capture != capture or r.compile != bool(engine.compile)
            or (weights and r.fingerprint != r.current())
        ):  # fmt: skip
            r = self._steps = SpecSteps(self, engine, capture=capture, compile=bool(engine.compile))
        return r

    @torch.no_grad()
    def decode_step(self, engine: Any, seqs: list[Any]) -> None:
        """Launch one speculative step for ``seqs``, then settle the step launched before it.

        One step stays in flight, as in the engine's own decode path: the step advances each row's state
        on the device (next token, position, remaining budget), so step t+1 is launched before the host
        has read step t's tokens. A sequence that step t finishes (EOS, stop) has one wasted row in step
        t+1, which settling drops. A batch with new sequences first settles the step in flight.
        """
        prev, self._inflight = self._inflight, None
        new = [s for s in seqs if id(s) not in self._states]
        if prev is not None and new:  # the batch changed (weights may have, between generates)
            self._settle(engine, prev)
            prev = None
        runner = self._runner(engine, weights=prev is None)
        if prev is not None and prev.runner is not runner:
            self._settle(engine, prev)
            prev = None
        seqs = [s for s in seqs if not s.finished]
        if not seqs:
            return
        for s in new:
            self._states[id(s)] = _State(seq=s)
        if new:
            self.drafter.begin(engine, new)
        if prev is None:  # give the device the host's view of every running row
            runner.load(seqs)
        rows = runner.rows(max(s.slot for s in seqs) + 1)
        self._inflight = runner.launch(seqs, rows, routes=engine.capture_routes, **filter_flags(seqs))
        if prev is not None:
            self._settle(engine, prev)

    def _settle(self, engine: Any, step: _InFlight) -> None:
        """Wait for a launched step and append its tokens to the sequences that still run."""
        if step.event is not None:
            step.event.synchronize()
        w = self.k + 1
        host = step.host
        toks_l, lp_l = host[:, :w].long().tolist(), host[:, w : 2 * w].tolist()
        n_l, cap_l = host[:, 2 * w].long().tolist(), host[:, 2 * w + 1].long().tolist()
        done = []
        for s in step.seqs:
            if s.finished:
                continue  # finished at the step before: this row ran past its end
            i, a = s.slot, n_l[s.slot]
            # Route rows of the fed tokens: the old last token and the drafts (the engine keeps those of
            # the tokens it takes).
            routes = None if step.routes is None else step.routes[i]
            taken = engine.accept(s, toks_l[i][: a + 1], lp_l[i][: a + 1], routes)
            st = self._states[id(s)].stats
            st.steps += 1
            st.drafted += cap_l[i]
            st.accepted += min(a, taken)
            st.emitted += taken
            if s.finished:
                self._finish(s)
                done.append(s.slot)
        if done and self._inflight is not None:
            self._inflight.runner.deactivate(done)  # the step in flight advanced them; stop them there

    def _finish(self, s: Any) -> None:
        st = self._states.pop(id(s)).stats
        for f in ("steps", "drafted", "accepted", "emitted"):
            setattr(self.totals, f, getattr(self.totals, f) + getattr(st, f))
        self._done[id(s)] = st.info()  # the engine asks for it (`finished`) as the sequence retires


@dataclass
class _InFlight:
    """A launched speculative step whose outputs the host has not read yet."""

    runner: SpecSteps
    seqs: list[Any]
    host: torch.Tensor  # float64 [rows, 2(k+1) + 2]: tokens, log-probs, accepted drafts, draft cap per row
    routes: Any  # int32 numpy [rows, k+1, L, k_e] view of a pinned buffer, or None
    event: Any  # torch.cuda.Event, or None on CPU (the copies were synchronous)


LAST, START, KEY, REMAIN, ACTIVE = range(5)  # rows of SpecSteps.state


class SpecSteps:
    """Static-shape speculative steps over cache slots 0..rows-1: captured per (rows, top-k, top-p)
    bucket on CUDA (compiled first with ``compile``), run as they are elsewhere.

    Row b is slot b; rows of free slots run dummy work in their own slots and are ignored. The device
    state per row: the token the verify forward starts with, its position, the sequence's sampling key,
    how many more tokens it may take after that one (drafts are capped by it) and whether it is active.
    The host loads it when the batch changes (`load`); each step advances the active rows itself.
    """

    def __init__(self, spec: Speculator, engine: Any, *, capture: bool, compile: bool) -> None:
        self.spec, self.engine, self.cache = spec, engine, engine.kv_cache
        self.capture, self.compile = capture, compile
        n, dev = self.cache.num_slots, engine.device
        self.state = torch.zeros(5, n, dtype=torch.long, device=dev)
        self.params = torch.ones(3, n, dtype=torch.float32, device=dev)  # temperature, top_p, top_k
        self._host = torch.zeros(5, n, dtype=torch.long, pin_memory=capture)
        self._host_params = torch.ones(3, n, dtype=torch.float32, pin_memory=capture)
        self._host_copies = HostCopies(n, dev)
        self._graphs: dict[tuple, Any] = {}
        self._pool = None
        self._fn = compile_step(self._step, dev) if compile else self._step
        fuse_qkv(engine.model)  # contiguous-slot forwards use one q/k/v GEMM per layer
        self.fingerprint = self.current()

    def current(self) -> tuple:
        return tuple(model_fingerprint(m) for m in [self.engine.model, *self.spec.drafter.modules()])

    def rows(self, n: int) -> int:
        """Rows of the step covering slots 0..n-1: a power-of-two bucket where shapes are reused."""
        return bucket(n, self.cache.num_slots) if self.capture or self.compile else n

    def load(self, seqs: list[Any]) -> None:
        host, hp = self._host, self._host_params
        host.zero_()
        # REMAIN: tokens a row may take after the one it feeds next (drafts past max_new_tokens are
        # never accepted, which keeps every real position inside the cache).
        vals = [
            [s.last_token, s.position, s.key, s.sampling.max_new_tokens - s.num_output - 1, 1] for s in seqs
        ]
        slots = torch.tensor([s.slot for s in seqs])
        host[:, slots] = torch.tensor(vals, dtype=torch.long).T
        hp[:, slots] = torch.tensor(
            [[s.sampling.temperature, s.sampling.top_p, float(s.sampling.top_k)] for s in seqs],
            dtype=torch.float32,
        ).T
        self.state.copy_(host, non_blocking=self.capture)
        self.params.copy_(hp, non_blocking=self.capture)

    def deactivate(self, slots: list[int]) -> None:
        self.state[ACTIVE, torch.tensor(slots, device=self.state.device)] = 0

    def launch(
        self, seqs: list[Any], rows: int, *, use_top_k: bool, use_top_p: bool, routes: bool
    ) -> _InFlight:
        """Run one step over rows 0..rows-1 and start copying its outputs to the host (no sync)."""
        key = (rows, use_top_k, use_top_p)
        if key not in self._graphs:
            self._graphs[key] = self._build(*key)
        out, route_t = self._graphs[key]()
        want = routes and route_t.numel() > 0
        host, host_routes, event = self._host_copies.copy(out, route_t if want else None)
        return _InFlight(self, seqs, host, None if host_routes is None else host_routes.numpy(), event)

    def _build(self, *args):
        if not self.capture:
            return lambda: self._fn(*args)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return capture_step(self._fn, args, [self.state, *self.spec.drafter.buffers()], self._pool)

    def _step(self, rows: int, use_top_k: bool, use_top_p: bool):
        eng, drafter, k = self.engine, self.spec.drafter, self.spec.k
        dev, max_len = eng.device, self.cache.max_len
        st = self.state[:, :rows]
        last, start, key, remain, active = st
        cap = remain.clamp(min=0, max=k)  # never accept drafts past max_new_tokens
        temp, top_p, top_k = self.params[:, :rows]
        top_k = top_k.long()
        drafts, q = drafter.draft(eng, rows, k, temp, key, start)  # [rows, k], [rows, k, V]
        # Verify: ONE forward of [last, d_1..d_k] at start..start+k. Positions past a row's real tokens
        # are clamped into the cache; real positions stay <= max_len - 2 (caps stop drafts before
        # max_new_tokens), so a clamped padding write at max_len - 1 never lands on a real token.
        ids = torch.cat([last[:, None], drafts], dim=1)
        pos = (start[:, None] + torch.arange(k + 1, device=dev)[None, :]).clamp(max=max_len - 1)
        routing = RoutingState(record=True) if eng.capture_routes else None
        out = eng.model(
            ids, position_ids=pos, kv_cache=self.cache, cache_slots=torch.arange(rows, device=dev),
            routing=routing, return_hidden=drafter.needs_hidden, kv_len=max_len, contiguous_slots=True,
        )  # fmt: skip
        # Target distributions p at every fed position (the sampler's: temperature, top-k, top-p) and
        # the tempered logits the reported log-probs come from.
        flat = out.logits.reshape(rows * (k + 1), -1)
        rep = lambda x: x.repeat_interleave(k + 1)  # noqa: E731
        scaled, masked, greedy = tempered_logits(
            flat, rep(temp), rep(top_p), rep(top_k), use_top_k, use_top_p
        )
        p = _probs(flat, masked, greedy).view(rows, k + 1, -1)
        n_acc, extra = self._judge(p, drafts, q, cap, key, start)
        # Row i appends drafts[:a_i] then the extra token.
        col = torch.arange(k + 1, device=dev)[None, :]
        toks = torch.cat([drafts, drafts.new_zeros(rows, 1)], dim=1)
        toks = torch.where(col == n_acc[:, None], extra[:, None], toks)
        lp = torch.log_softmax(scaled, dim=-1).view(rows, k + 1, -1)
        lp = lp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)
        drafter.advance(rows, out.hidden, toks, n_acc + 1, start)
        # The next step starts from each active row's extra token; idle rows stay where they are.
        taken = (n_acc + 1) * active
        st[LAST].copy_(torch.where(active > 0, extra, last))
        st[START].copy_(start + taken)
        st[REMAIN].copy_(remain - taken)
        if routing is not None and routing.used_topk:
            routes = torch.stack(routing.used_topk, dim=2).to(torch.int32)
        else:
            routes = torch.zeros(rows, k + 1, 0, 0, dtype=torch.int32, device=dev)
        host = torch.cat([toks.double(), lp.double(), n_acc.double()[:, None], cap.double()[:, None]], dim=1)
        return host, routes

    def _judge(self, p, drafts, q, cap, key, start):
        """Rejection sampling of the drafts against the target distributions ``p`` [B, k+1, V]:
        (number of accepted drafts [B], the extra token [B]: the residual sample or the bonus)."""
        b, kp1, vocab = p.shape
        k = kp1 - 1
        dev = p.device
        index = start[:, None] + 1 + torch.arange(k, device=dev)[None, :]  # positions of the drafts
        pd = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
        qd = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
        if self.spec.verifier == "rejection":
            ok = keyed_uniform(key[:, None], index, ACCEPT_STREAM) * qd < pd
        else:
            ok = torch.ones_like(pd, dtype=torch.bool)
        ok = ok & (torch.arange(k, device=dev)[None, :] < cap[:, None])
        n_acc = ok.long().cumprod(dim=1).sum(dim=1)
        pick = lambda x, i: x.gather(1, i[:, None, None].expand(-1, 1, vocab))[:, 0]  # noqa: E731
        p_at = pick(p, n_acc)
        resid = (p_at - pick(q, n_acc.clamp(max=k - 1))).clamp(min=0)
        # p == q leaves no residual mass; rejection then cannot happen, so any choice is exact.
        use = (n_acc < cap) & (resid.sum(-1) > 0)
        dist = torch.where(use[:, None], resid, p_at)
        return n_acc, race(dist, key, start + 1 + n_acc, RESIDUAL_STREAM)


def aggregate(infos: list[dict[str, float]]) -> dict[str, float]:
    """Rollout-level means of per-sample spec_info, weighted by verify steps."""
    steps = np.array([i.get("spec_verify_steps", 0.0) for i in infos])
    if not len(infos) or steps.sum() == 0:
        return {}
    length = np.array([i["spec_accept_length"] for i in infos])
    drafted = np.array([i["spec_draft_tokens"] for i in infos])
    rate = np.array([i["spec_accept_rate"] for i in infos])
    return {
        "spec_accept_length": float((length * steps).sum() / steps.sum()),
        "spec_accept_rate": float((rate * drafted).sum() / max(drafted.sum(), 1.0)),
    }
