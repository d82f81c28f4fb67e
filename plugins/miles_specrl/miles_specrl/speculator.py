"""Speculative decoding for the built-in engine: draft k tokens, verify them in one target forward.

Installed as ``engine.speculator``. Each decode step drafts up to k tokens per running sequence (with the
model's MTP depth reused autoregressively, EAGLE-style, or with a separate small draft model), runs ONE
target forward over ``[last token, d_1..d_k]`` through the engine's KV cache, and accepts by rejection
sampling (Leviathan et al., 2023), so every token follows the target's sampling distribution exactly at
any temperature / top-p / top-k; the reported log-probs are the target's (tempered, as the sampler's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from miles_core.engine import tempered_logits
from miles_core.model import KVCache, RoutingState
from miles_specrl.drafters import Drafter


def target_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """The distribution `miles_core.engine.sample_tokens` samples from, per row of ``logits`` [N, V].

    Greedy rows (temperature <= 0) become one-hot at the argmax.
    """
    _, masked, greedy = tempered_logits(logits, temperature, top_p, top_k)
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
    """``engine.speculator``: one speculative decode step for every running sequence.

    :param drafter: proposes draft tokens (`miles_specrl.drafters.MTPDrafter` or ``ModelDrafter``).
    :param num_steps: k, draft tokens per step (``--sglang-speculative-num-steps``).
    :param verifier: ``"rejection"``; ``"accept_all"`` is a deliberately wrong verifier for tests.
    """

    def __init__(self, drafter: Drafter, num_steps: int, verifier: str = "rejection") -> None:
        self.drafter, self.k, self.verifier = drafter, num_steps, verifier
        self._states: dict[int, _State] = {}
        self.totals = SeqStats()

    def attach(self, engine: Any) -> None:
        self.drafter.attach(engine, self.k + 1)
        engine.speculator = self

    def reset(self) -> None:
        self._states.clear()
        self.totals = SeqStats()
        self.drafter.reset()

    # ------------------------------------------------------------------ the decode step

    @torch.no_grad()
    def decode_step(self, engine: Any, seqs: list[Any]) -> None:
        cache: KVCache = engine.kv_cache
        dev = engine.device
        for s in seqs:
            if id(s) not in self._states:
                self._states[id(s)] = _State(seq=s)
                self.drafter.begin(s)
        # Never draft past max_new_tokens: it keeps every position inside the cache (see _positions).
        ks = [max(0, min(self.k, s.params.max_new_tokens - len(s.out) - 1)) for s in seqs]
        kmax = max(ks)
        temp, top_p, top_k = _params(seqs, dev)
        drafts, q = self.drafter.draft(engine, seqs, kmax, temp, engine.generator)  # [B, K], [B, K, V]
        logits, hidden, routing = self._verify(engine, cache, seqs, drafts, kmax)
        n_acc, extra = self._judge(logits, drafts, q, ks, temp, top_p, top_k, engine.generator)
        engine.stats["decode_steps"] += 1
        # Row i appends drafts[:a_i] then the extra token: one matrix, one gather, one host copy.
        rows = torch.arange(len(seqs), device=dev)
        toks = torch.cat([drafts, drafts.new_zeros(len(seqs), 1)], dim=1)
        toks[rows, n_acc] = extra
        lp = torch.log_softmax(logits.float() / _safe_temp(temp)[:, None, None], dim=-1)
        lp = lp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        start = torch.tensor([len(s.prompt) + len(s.out) - 1 for s in seqs], device=dev)
        self.drafter.advance(slots, hidden, toks, n_acc + 1, start)
        n_acc_l, toks_l, lp_l = n_acc.tolist(), toks.tolist(), lp.tolist()
        for i, s in enumerate(seqs):
            a = n_acc_l[i]
            taken = engine.accept(s, toks_l[i][: a + 1], lp_l[i][: a + 1])
            if routing is not None:  # rows of the fed tokens that stay: the old last token and kept drafts
                kept = [t[i, :taken] for t in routing.used_topk]
                s.routes.append(torch.stack(kept, dim=1).to(torch.int32).cpu().numpy())
            st = self._states[id(s)].stats
            st.steps += 1
            st.drafted += ks[i]
            st.accepted += min(a, taken)
            st.emitted += taken
            if s.finish is not None:
                self._finish(s)

    def _verify(self, engine: Any, cache: KVCache, seqs: list[Any], drafts: torch.Tensor, kmax: int):
        dev = engine.device
        last = torch.tensor([[s.out[-1]] for s in seqs], device=dev)
        ids = torch.cat([last, drafts], dim=1)
        start = torch.tensor([len(s.prompt) + len(s.out) - 1 for s in seqs], device=dev)
        pos = _positions(start, kmax + 1, cache.max_len)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        routing = RoutingState(record=True) if engine.capture_routes else None
        want_hidden = self.drafter.needs_hidden
        out = engine.model(
            ids,
            position_ids=pos,
            kv_cache=cache,
            cache_slots=slots,
            routing=routing,
            return_hidden=want_hidden,
        )
        return out.logits, out.hidden, routing

    def _judge(self, logits, drafts, q, ks, temp, top_p, top_k, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """(number of accepted drafts [B], the extra token [B]: the residual sample or the bonus)."""
        b, kp1, vocab = logits.shape
        kmax = kp1 - 1
        rep = kp1
        p = target_probs(
            logits.reshape(-1, vocab),
            temp.repeat_interleave(rep),
            top_p.repeat_interleave(rep),
            top_k.repeat_interleave(rep),
        ).view(b, kp1, vocab)
        dev = logits.device
        limit = torch.arange(kmax, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]
        if kmax:
            pd = p[:, :kmax].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            qd = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
            u = torch.rand(b, kmax, generator=gen, device=dev)
            ok = (u * qd < pd) if self.verifier == "rejection" else torch.ones_like(pd, dtype=torch.bool)
            ok = ok & limit
            n_acc = ok.long().cumprod(dim=1).sum(dim=1)
        else:
            n_acc = torch.zeros(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)
        p_at = p[rows, n_acc]
        rejected = n_acc < torch.tensor(ks, device=dev)
        if kmax:
            q_at = q[rows, n_acc.clamp(max=kmax - 1)]
            resid = (p_at - q_at).clamp(min=0)
            # p == q leaves no residual mass; rejection then cannot happen, so any choice is exact.
            use = rejected & (resid.sum(-1) > 0)
            dist = torch.where(use[:, None], resid, p_at)
        else:
            dist = p_at
        extra = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)
        return n_acc, extra

    def _finish(self, s: Any) -> None:
        st = self._states.pop(id(s)).stats
        self.drafter.end(s)
        for f in ("steps", "drafted", "accepted", "emitted"):
            setattr(self.totals, f, getattr(self.totals, f) + getattr(st, f))
        s.spec_info = st.info()  # the engine hands it out as EngineOutput.spec_info


def _params(seqs: list[Any], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temp = torch.tensor([s.params.temperature for s in seqs], dtype=torch.float32, device=dev)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=torch.float32, device=dev)
    top_k = torch.tensor([s.params.top_k for s in seqs], dtype=torch.long, device=dev)
    return temp, top_p, top_k


def _safe_temp(temp: torch.Tensor) -> torch.Tensor:
    return torch.where(temp <= 0, torch.ones_like(temp), temp)


def _positions(start: torch.Tensor, width: int, max_len: int) -> torch.Tensor:
    """[B, width] positions start, start+1, ...; padding past a row's real tokens is clamped into the
    cache. Real positions stay <= max_len - 2 (drafts stop before max_new_tokens), so a clamped padding
    write at max_len - 1 never lands on a real token."""
    pos = start[:, None] + torch.arange(width, device=start.device)[None, :]
    return pos.clamp(max=max_len - 1)


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
