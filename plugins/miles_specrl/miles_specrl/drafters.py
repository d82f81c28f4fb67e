"""Draft proposers for the speculator: the model's own MTP head, or a separate small draft model.

Each drafter keeps its own KV cache, slot-for-slot with the engine's, and per-slot device buffers of
pending entries: the tokens (and, for MTP, target hidden states) that verification confirmed but the
draft has not seen yet, at most k + 1 of them. A draft step runs a row's pending entries (which yields the
first draft token) and then feeds its own drafts back, one token per step; rejected drafts are simply
overwritten next time. Every shape in a draft step is fixed by (rows, k), so the speculator can capture
it in a CUDA graph with the verify forward. A sequence fresh from prefill has more pending entries (its
whole prompt): `begin` runs all but the last k + 1 of them eagerly and leaves those in the buffers.
"""

from __future__ import annotations

from typing import Any

import torch

from miles_core import UsageError
from miles_core.api import CausalLM, KVCache, keyed_exponentials
from miles_specrl.mtp import _dense_config, embed, head_logits, step_context

# Noise streams of the speculative step, XORed into a sequence's sampling key (stream 0, the engine's
# own draws, is the key itself): each random choice gets its own counter-based draws.
DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 0x5BD1E995, 0x27D4EB2F, 0x165667B1


def race(probs: torch.Tensor, key: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """One sample per row of ``probs`` [B, V] by the exponential race, with noise keyed by
    (key ^ stream, index): a pure function of the sequence, the token position and the stream."""
    return (probs / keyed_exponentials(key ^ stream, index, probs.shape[-1])).argmax(-1)


def keyed_uniform(key: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """float32 U(0, 1) draws of the shape of ``index`` (``key`` broadcast to it): exp(-E), E ~ Exp(1)."""
    key, index = torch.broadcast_tensors(key, index)
    e = keyed_exponentials((key ^ stream).reshape(-1), index.reshape(-1), 1)
    return torch.exp(-e).view(index.shape)


def draft_probs(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """q: tempered softmax of the draft logits [B, V]; one-hot argmax on greedy rows."""
    logits = logits.float()
    greedy = temp <= 0
    t = torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None], onehot, torch.softmax(logits / t, dim=-1))


class Drafter:
    """Common draft loop; subclasses say what a new sequence's pending entries are and how a forward of
    the draft runs (`_body`) and projects onto the vocabulary (`_head`)."""

    needs_hidden = False
    offset = 0  # first pending position relative to the verify forward's first position

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self._engine_cache: Any = None
        self.vocab = 0
        self.width = 1
        self.buf_tok = self.buf_len = self.buf_pos = self.buf_hid = None

    def attach(self, engine: Any, width: int = 4) -> None:
        self.vocab = engine.model.config.vocab_size
        if width != self.width:
            self._engine_cache = None  # buffers are sized by the width
        self.width = width

    def reset(self) -> None:
        pass

    def _make_cache(self, engine: Any) -> KVCache:
        raise NotImplementedError

    def sync(self, engine: Any) -> bool:
        """Size the draft cache and the pending buffers after the engine's cache; True if re-made."""
        if self.cache is not None and self._engine_cache is engine.kv_cache:
            return False
        self.cache = self._make_cache(engine)
        self._engine_cache = engine.kv_cache
        n, dev = self.cache.num_slots, engine.device
        self.buf_tok = torch.zeros(n, self.width, dtype=torch.long, device=dev)
        self.buf_len = torch.ones(n, dtype=torch.long, device=dev)
        self.buf_pos = torch.zeros(n, dtype=torch.long, device=dev)
        if self.needs_hidden:
            h = engine.model.config.hidden_size
            self.buf_hid = torch.zeros(n, self.width, h, dtype=engine.dtype, device=dev)
        return True

    def buffers(self) -> list[torch.Tensor]:
        """The device state a draft step advances (restored after the warm-ups of a graph capture)."""
        return [t for t in (self.buf_tok, self.buf_len, self.buf_pos, self.buf_hid) if t is not None]

    def modules(self) -> list[torch.nn.Module]:
        """Modules whose weights a draft step reads besides the engine's model (for graph validity)."""
        return []

    def entries(self, seq: Any) -> tuple[list[int], torch.Tensor | None]:
        """A sequence's pending entries right after prefill (tokens, and hidden states [n, H] for MTP),
        the first at position 0."""
        raise NotImplementedError

    @torch.no_grad()
    def begin(self, engine: Any, seqs: list[Any]) -> None:
        """Take sequences fresh from prefill: run all but each one's last ``width`` pending entries into
        the draft cache (one padded forward) and put those last entries in its slot's buffers."""
        self.sync(engine)
        dev, w = engine.device, self.width
        entries = [self.entries(s) for s in seqs]
        heads = [(s, t, h) for s, (t, h) in zip(seqs, entries) if len(t) > w]
        if heads:
            n = max(len(t) - w for _, t, _ in heads)
            ids = torch.tensor([t[: len(t) - w] + [0] * (n - len(t) + w) for _, t, _ in heads], device=dev)
            hidden = None
            if self.needs_hidden:
                hidden = torch.nn.utils.rnn.pad_sequence(
                    [h[: len(t) - w] for _, t, h in heads], batch_first=True
                )
                hidden = hidden.to(engine.dtype)
            pos = torch.arange(n, device=dev)[None, :].expand(len(heads), n)
            slots = torch.tensor([s.slot for s, _, _ in heads], device=dev)
            self._body(engine, hidden, ids, pos, slots, n, False)  # padding writes are overwritten later
        for s, (t, h) in zip(seqs, entries):
            m = min(len(t), w)
            self.buf_tok[s.slot, :m] = torch.tensor(t[len(t) - m :], device=dev)
            self.buf_len[s.slot] = m
            self.buf_pos[s.slot] = len(t) - m
            if self.needs_hidden:
                self.buf_hid[s.slot, :m] = h[len(h) - m :].to(self.buf_hid.dtype)

    def advance(self, rows: int, hidden: torch.Tensor | None, tokens: torch.Tensor, counts: torch.Tensor,
                start: torch.Tensor) -> None:  # fmt: skip
        """After verification, for slots 0..rows-1: slot i's next pending entries are
        ``tokens[i, :counts[i]]`` (with ``hidden[i, :counts[i]]``), the first at ``start[i] + offset``."""
        self.buf_tok[:rows].copy_(tokens)
        self.buf_len[:rows].copy_(counts)
        self.buf_pos[:rows].copy_(start + self.offset)
        if hidden is not None:
            self.buf_hid[:rows].copy_(hidden)

    def _body(self, engine: Any, hidden: Any, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
              kv_len: int, contiguous: bool) -> tuple[torch.Tensor, Any]:  # fmt: skip
        """One draft forward over ``ids`` [B, T] at ``pos`` through the draft cache: (states [B, T, H] for
        `_head`, carry [B, T, H] for the next draft step or None)."""
        raise NotImplementedError

    def _head(self, engine: Any, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def first(self, engine: Any, rows: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run slots 0..rows-1's pending entries: (draft logits [rows, V], carry, position) at each row's
        last entry."""
        dev, w, max_len = engine.device, self.width, self.cache.max_len
        slots = torch.arange(rows, device=dev)
        ids, lens = self.buf_tok[:rows], self.buf_len[:rows]
        pos = (self.buf_pos[:rows, None] + torch.arange(w, device=dev)[None, :]).clamp(max=max_len - 1)
        hidden = self.buf_hid[:rows] if self.needs_hidden else None
        states, carry = self._body(engine, hidden, ids, pos, slots, max_len, True)
        last = (lens - 1)[:, None]
        pick = lambda x: x.gather(1, last[..., None].expand(-1, 1, x.shape[-1]))[:, 0]  # noqa: E731
        logits = self._head(engine, pick(states))
        return logits, None if carry is None else pick(carry), pos.gather(1, last)[:, 0]

    def draft(self, engine: Any, rows: int, k: int, temp: torch.Tensor, key: torch.Tensor,
              start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``k`` draft tokens for slots 0..rows-1 and the draft distributions they were drawn from.

        Draft t is the token at position ``start + 1 + t`` (``start``: the position of the token the verify
        forward starts with) and is drawn with noise keyed by that position.

        :returns: ``(drafts int64 [rows, k], q float32 [rows, k, V])``.
        """
        logits, carry, last_pos = self.first(engine, rows)
        slots = torch.arange(rows, device=engine.device)
        max_len = self.cache.max_len
        drafts, qs = [], []
        for t in range(k):
            if t:
                pos = (last_pos + t).clamp(max=max_len - 1)[:, None]
                states, carry = self._body(
                    engine, None if carry is None else carry[:, None], drafts[-1][:, None], pos, slots,
                    max_len, True,
                )  # fmt: skip
                logits = self._head(engine, states[:, 0])
                carry = None if carry is None else carry[:, 0]
            q = draft_probs(logits[:, : self.vocab], temp)
            qs.append(q)
            drafts.append(race(q, key, start + 1 + t, DRAFT_STREAM))
        return torch.stack(drafts, 1), torch.stack(qs, 1)


class MTPDrafter(Drafter):
    """Drafts with MTP depth 1 of ``engine.model.mtp``, fed back its own output hidden state after the
    first step (as SGLang's EAGLE does with a single next-n layer). Prompt hidden states come from the
    engine's prefill forward, captured by hooks on the engine model."""

    needs_hidden = True
    offset = 0  # entry i pairs the target state at position i with token i+1

    def __init__(self) -> None:
        super().__init__()
        # Prefilled rows by (width, padded ids): a sequence finds its prompt's states in O(1).
        self._prefills: dict[tuple[int, ...], torch.Tensor] = {}
        self._widths: set[int] = set()
        self._hooks: list[Any] = []
        self._model: CausalLM | None = None

    def attach(self, engine: Any, width: int = 4) -> None:
        super().attach(engine, width)
        model = engine.model
        if getattr(model, "mtp", None) is None:
            raise UsageError("speculative EAGLE drafting needs MTP heads; pass --mtp-num-layers N (N >= 1).")
        if self._model is not model:
            for h in self._hooks:
                h.remove()
            self._hooks = [
                model.register_forward_pre_hook(self._pre, with_kwargs=True),
                model.register_forward_hook(self._post, with_kwargs=True),
            ]
            self._model = model

    def reset(self) -> None:
        self._prefills.clear()
        self._widths.clear()

    @staticmethod
    def _is_prefill(kwargs: dict) -> bool:
        pos = kwargs.get("position_ids")
        if kwargs.get("kv_cache") is None or pos is None or kwargs.get("contiguous_slots"):
            return False  # the speculative step's verify forwards (contiguous slots) are never prefills
        return bool((pos[:, 0] == 0).all())

    def _pre(self, module: Any, args: tuple, kwargs: dict):
        if self._is_prefill(kwargs):
            return args, {**kwargs, "return_hidden": True}
        return None

    def _post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._is_prefill(kwargs) and output.hidden is not None:
            ids = args[0] if args else kwargs["input_ids"]
            for row, h in zip(ids.tolist(), output.hidden):
                self._prefills[tuple(row)] = h
            self._widths.add(ids.shape[1])

    def _make_cache(self, engine: Any) -> KVCache:
        c = engine.kv_cache
        return KVCache(
            _dense_config(engine.model.config), c.num_slots, c.max_len, engine.dtype, engine.device
        )

    def entries(self, seq: Any) -> tuple[list[int], torch.Tensor]:
        n = len(seq.prompt)
        hidden = None
        for width in self._widths:  # one width per prefill batch
            h = self._prefills.get(tuple(seq.prompt) + (0,) * (width - n)) if width >= n else None
            if h is not None:
                hidden = h[:n]
                break
        if hidden is None:  # not prefilled through the hooked engine: recompute the prompt's states
            ids = torch.tensor([list(seq.prompt)], device=self._model.lm_head.weight.device)
            hidden = self._model(ids, return_hidden=True).hidden[0]
        # Entry i pairs the target state at position i with token i+1; the last one with the sampled token.
        return list(seq.prompt[1:]) + list(seq.output[:1]), hidden

    def begin(self, engine: Any, seqs: list[Any]) -> None:
        super().begin(engine, seqs)
        self._prefills.clear()  # every sequence of those prefills has begun
        self._widths.clear()

    def _body(self, engine, hidden, ids, pos, slots, kv_len, contiguous):
        model = engine.model
        ctx = step_context(model, pos, hidden.dtype, self.cache, slots, kv_len, contiguous)
        return model.mtp.layers[0](hidden, embed(model, ids).to(hidden.dtype), ctx)[::-1]

    def _head(self, engine: Any, states: torch.Tensor) -> torch.Tensor:
        return head_logits(engine.model, states)


class ModelDrafter(Drafter):
    """Drafts with a separate small `CausalLM` sharing the target's tokenizer
    (``--sglang-speculative-draft-model-path``)."""

    offset = 1  # the draft model has already seen the token the verify forward starts with

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model = model.eval()

    def attach(self, engine: Any, width: int = 4) -> None:
        super().attach(engine, width)
        if self.model.config.vocab_size < self.vocab:
            raise UsageError(
                f"the draft model's vocabulary ({self.model.config.vocab_size}) is smaller than the target's "
                f"({self.vocab}); use a draft model with the target's tokenizer."
            )

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _make_cache(self, engine: Any) -> KVCache:
        c = engine.kv_cache
        dtype = next(self.model.parameters()).dtype
        return KVCache(self.model.config, c.num_slots, c.max_len, dtype, engine.device)

    def entries(self, seq: Any) -> tuple[list[int], None]:
        return list(seq.prompt) + list(seq.output[:1]), None

    def _body(self, engine, hidden, ids, pos, slots, kv_len, contiguous):
        out = self.model(
            ids, position_ids=pos, kv_cache=self.cache, cache_slots=slots, kv_len=kv_len,
            contiguous_slots=contiguous, compute_logits=False,
        )  # fmt: skip
        return out.hidden, None

    def _head(self, engine: Any, states: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(states)
