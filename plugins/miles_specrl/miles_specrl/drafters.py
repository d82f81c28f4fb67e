"""Draft proposers for the speculator: the model's own MTP head, or a separate small draft model.

Each drafter keeps its own KV cache, slot-for-slot with the engine's, and a per-sequence list of pending
entries: the tokens (and, for MTP, target hidden states) the verify step confirmed but the draft has not
yet seen. A draft step first runs those pending entries (which yields the first draft token) and then
feeds its own drafts back, one token per step; rejected drafts are simply overwritten next time.
"""

from __future__ import annotations

from typing import Any

import torch

from miles_core import UsageError
from miles_core.model import CausalLM, KVCache
from miles_specrl.mtp import _dense_config, embed, head_logits, step_context


def draft_probs(logits: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """q: tempered softmax of the draft logits [B, V]; one-hot argmax on greedy rows."""
    logits = logits.float()
    greedy = temp <= 0
    t = torch.where(greedy, torch.ones_like(temp), temp)[:, None]
    onehot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.where(greedy[:, None], onehot, torch.softmax(logits / t, dim=-1))


class Drafter:
    """Common draft loop; subclasses define how pending entries and single steps run.

    Steady-state pending entries live in per-slot device buffers (tokens, lengths, first position and,
    for MTP, target hidden states), written once per step for the whole batch, so a step costs a fixed
    number of kernels however many sequences run. A sequence just out of prefill starts from its prompt.
    """

    needs_hidden = False
    offset = 0  # first pending position relative to the verify forward's first position

    def __init__(self) -> None:
        self.cache: KVCache | None = None
        self._engine_cache: Any = None
        self._new: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        self.vocab = 0
        self.width = 1
        self.buf_tok = self.buf_len = self.buf_pos = self.buf_hid = None

    def attach(self, engine: Any, width: int = 4) -> None:
        self.vocab = engine.model.config.vocab_size
        self.width = width

    def reset(self) -> None:
        self._new.clear()

    def _make_cache(self, engine: Any) -> KVCache:
        raise NotImplementedError

    def _sync_cache(self, engine: Any) -> None:
        if self.cache is None or self._engine_cache is not engine.kv_cache:
            self.cache = self._make_cache(engine)
            self._engine_cache = engine.kv_cache
            n, dev = self.cache.num_slots, engine.device
            self.buf_tok = torch.zeros(n, self.width, dtype=torch.long, device=dev)
            self.buf_len = torch.ones(n, dtype=torch.long, device=dev)
            self.buf_pos = torch.zeros(n, dtype=torch.long, device=dev)
            if self.needs_hidden:
                h = engine.model.config.hidden_size
                self.buf_hid = torch.zeros(n, self.width, h, dtype=engine.dtype, device=dev)

    def begin(self, seq: Any) -> None:
        raise NotImplementedError

    def end(self, seq: Any) -> None:
        self._new.pop(id(seq), None)

    def advance(self, slots: torch.Tensor, hidden: torch.Tensor | None, tokens: torch.Tensor,
                counts: torch.Tensor, start: torch.Tensor) -> None:  # fmt: skip
        """After verification, for the whole batch: row i's next pending entries are ``tokens[i, :counts[i]]``
        (with ``hidden[i, :counts[i]]``), the first at position ``start[i] + offset``."""
        w = tokens.shape[1]
        self.buf_tok[slots, :w] = tokens
        self.buf_len[slots] = counts
        self.buf_pos[slots] = start + self.offset
        if hidden is not None:
            self.buf_hid[slots, :w] = hidden.to(self.buf_hid.dtype)

    def _run(self, engine: Any, hidden: Any, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor):
        """One draft forward over ``ids`` [B, T] at ``pos``; returns (logits [B, T, V], carry or None)."""
        raise NotImplementedError

    def _extend(self, engine: Any, seqs: list[Any]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run every sequence's pending entries; (logits, carry, position) at each row's last entry."""
        dev = engine.device
        new = [i for i, s in enumerate(seqs) if id(s) in self._new]
        old = [i for i, s in enumerate(seqs) if id(s) not in self._new]
        parts = []
        for idx, fn in ((old, self._extend_old), (new, self._extend_new)):
            if idx:
                parts.append((torch.tensor(idx, device=dev), fn(engine, [seqs[i] for i in idx])))
        if len(parts) == 1:
            return parts[0][1]
        (ia, (la, ca, pa)), (ib, (lb, cb, pb)) = parts
        order = torch.argsort(torch.cat([ia, ib]))
        cat = lambda a, b: None if a is None else torch.cat([a, b])[order]  # noqa: E731
        return cat(la, lb), cat(ca, cb), cat(pa, pb)

    def _extend_old(self, engine: Any, seqs: list[Any]):
        dev = engine.device
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        ids, lens = self.buf_tok[slots], self.buf_len[slots]
        pos = (self.buf_pos[slots][:, None] + torch.arange(self.width, device=dev)[None, :]).clamp(
            max=self.cache.max_len - 1
        )
        hidden = self.buf_hid[slots] if self.needs_hidden else None
        logits, carry = self._run(engine, hidden, ids, pos, slots)
        rows = torch.arange(len(seqs), device=dev)
        return logits[rows, lens - 1], None if carry is None else carry[rows, lens - 1], pos[rows, lens - 1]

    def _extend_new(self, engine: Any, seqs: list[Any]):
        """Sequences fresh from prefill: their pending entries are the whole prompt (right-padded)."""
        dev = engine.device
        entries = [self._new.pop(id(s)) for s in seqs]
        lens = [len(t) for t, _ in entries]
        n = max(lens)
        # One host->device copy for the ids and one padded stack for the states (no per-row kernels).
        ids = torch.tensor([t + [0] * (n - len(t)) for t, _ in entries], device=dev)
        hidden = None
        if self.needs_hidden:
            hidden = torch.nn.utils.rnn.pad_sequence([h for _, h in entries], batch_first=True)
            hidden = hidden[:, :n].to(engine.dtype)
        pos = torch.arange(n, device=dev)[None, :].expand(len(seqs), n).clamp(max=self.cache.max_len - 1)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        logits, carry = self._run(engine, hidden, ids, pos, slots)
        rows, last = torch.arange(len(seqs), device=dev), torch.tensor(lens, device=dev) - 1
        return logits[rows, last], None if carry is None else carry[rows, last], pos[rows, last]

    def _step(self, engine: Any, carry: Any, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor):
        logits, carry = self._run(
            engine, None if carry is None else carry[:, None], tokens[:, None], pos[:, None], slots
        )
        return logits[:, 0], None if carry is None else carry[:, 0]

    @torch.no_grad()
    def draft(
        self, engine: Any, seqs: list[Any], k: int, temp: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` draft tokens per sequence and the draft distributions they were sampled from.

        :returns: ``(drafts int64 [B, k], q float32 [B, k, V])``.
        """
        self._sync_cache(engine)
        dev = engine.device
        logits, carry, last_pos = self._extend(engine, seqs)
        slots = torch.tensor([s.slot for s in seqs], device=dev)
        drafts, qs = [], []
        for t in range(k):
            if t:
                pos = (last_pos + t).clamp(max=self.cache.max_len - 1)
                logits, carry = self._step(engine, carry, drafts[-1], pos, slots)
            q = draft_probs(logits[:, : self.vocab], temp)
            qs.append(q)
            drafts.append(torch.multinomial(q, 1, generator=gen).squeeze(-1))
        if not k:
            return torch.zeros(len(seqs), 0, dtype=torch.long, device=dev), torch.zeros(
                len(seqs), 0, self.vocab, device=dev
            )
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
        super().reset()
        self._prefills.clear()
        self._widths.clear()

    @staticmethod
    def _is_prefill(kwargs: dict) -> bool:
        pos = kwargs.get("position_ids")
        return kwargs.get("kv_cache") is not None and pos is not None and bool((pos[:, 0] == 0).all())

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

    def begin(self, seq: Any) -> None:
        n = len(seq.prompt)
        hidden = None
        for width in self._widths:  # one width per prefill batch
            h = self._prefills.get(tuple(seq.prompt) + (0,) * (width - n)) if width >= n else None
            if h is not None:
                hidden = h[:n]
                break
        if hidden is None:  # not prefilled through the hooked engine: recompute the prompt's states
            ids = torch.tensor([seq.prompt], device=self._model.lm_head.weight.device)
            hidden = self._model(ids, return_hidden=True).hidden[0]
        # Entry i pairs the target state at position i with token i+1; the last one with the sampled token.
        self._new[id(seq)] = (list(seq.prompt[1:]) + list(seq.out[:1]), hidden)

    def _extend(self, engine: Any, seqs: list[Any]):
        out = super()._extend(engine, seqs)
        self._prefills.clear()  # every new sequence of this step has begun
        self._widths.clear()
        return out

    def _run(self, engine: Any, hidden: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, slots):
        model = engine.model
        ctx = step_context(model, pos, hidden.dtype, self.cache, slots)
        carry, normed = model.mtp.layers[0](hidden, embed(model, ids).to(hidden.dtype), ctx)
        return head_logits(model, normed), carry


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

    def _make_cache(self, engine: Any) -> KVCache:
        c = engine.kv_cache
        dtype = next(self.model.parameters()).dtype
        return KVCache(self.model.config, c.num_slots, c.max_len, dtype, engine.device)

    def begin(self, seq: Any) -> None:
        self._new[id(seq)] = (list(seq.prompt) + list(seq.out[:1]), None)

    def _run(self, engine: Any, hidden: Any, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor):
        return self.model(ids, position_ids=pos, kv_cache=self.cache, cache_slots=slots).logits, None
