"""A request of the built-in engine: its running state, the read-only view a decode strategy gets, the
decode-strategy interface, and what a finished request returns (`EngineOutput`).

The engine owns each sequence's state (`_Seq`). A decode strategy (e.g. a speculative decoder a plugin
returns from ``pre_rollout``) sees only `SequenceView`s and appends tokens through
``Engine.accept(view, tokens, log_probs, routes)``; the engine does the bookkeeping (stops, slots,
routes, the step count).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

from miles_core.engine.sampler import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from miles_core.engine.engine import Engine


@dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    future: asyncio.Future
    rid: str | None = None  # the caller's request id (abort(rid))
    slot: int = -1
    out: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # the weight version each output token came from
    routes: list[np.ndarray] = field(default_factory=list)  # chunks [n, L, k] in token order
    finish: str | None = None
    key: int = 0  # sampling key: the token at index i is drawn with keyed_exponentials(key, i, V)
    pos: int = 0  # static decode path: the position this sequence feeds at the next launched step
    arrived: float = field(default_factory=time.perf_counter)  # when generate() queued it
    view: SequenceView = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = SequenceView(self)

    def finish_reason(self, tok: int, eos: set[int], tokenizer: Any) -> str | None:
        """Why the sequence stops after appending ``tok``, or None if it goes on."""
        if tok in eos or tok in self.params.stop_token_ids:
            return "stop"
        if self.params.stop and tokenizer is not None:
            tail = tokenizer.decode(self.out[-32:], skip_special_tokens=False)
            if any(stop in tail for stop in self.params.stop):
                return "stop"
        if len(self.out) >= self.params.max_new_tokens:
            return "length"
        return None

    def result(self, weight_version: int, info: dict) -> EngineOutput:
        routes = None
        if self.routes:
            # The last sampled token is never fed back, so it has no routing row.
            routes = np.concatenate(self.routes, axis=0)[: len(self.prompt) + len(self.out) - 1]
        p = self.params
        used = {"temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k}
        return EngineOutput(
            self.out, self.logps, self.finish, len(self.prompt), weight_version, routes, info, used,
            self.rid, self.versions,
        )  # fmt: skip


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end a sequence: the model config's ``eos_token_id`` (one or several) and the
    tokenizer's."""
    ids: set[int] = set()
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return ids


@dataclass
class EngineOutput:
    """What one request produced."""

    output_ids: list[int]
    log_probs: list[float]  # [len(output_ids)] log p of each sampled token (tempered)
    finish_reason: str  # "stop" (EOS / stop token / stop string), "length" or "abort"
    prompt_len: int
    weight_version: int
    routed_experts: np.ndarray | None = None  # int32 [prompt_len + len(output_ids) - 1, L, topk]
    spec_info: dict = field(default_factory=dict)  # from the decode strategy (spec_accept_length, ...)
    sampling_params: dict = field(default_factory=dict)  # temperature, top_p, top_k it sampled with
    rid: str | None = None  # the request id the caller gave
    output_weight_versions: list[int] = field(default_factory=list)  # [len(output_ids)] version per token


class SequenceView:
    """What a decode strategy may read of one running sequence (nothing here can change it).

    One view per sequence for its whole life, so a strategy may key its own per-sequence state by it.
    """

    __slots__ = ("_seq", "prompt")

    def __init__(self, seq: _Seq) -> None:
        self._seq = seq
        self.prompt: tuple[int, ...] = tuple(seq.prompt)  #: the prompt's token ids

    @property
    def slot(self) -> int:
        """The KV-cache row the sequence occupies (its row in a static-shape step)."""
        return self._seq.slot

    @property
    def key(self) -> int:
        """Sampling key: the engine draws token ``i`` with ``keyed_exponentials(key, i, vocab)``."""
        return self._seq.key

    @property
    def sampling(self) -> SamplingParams:
        """The request's sampling parameters (temperature, top_p, top_k, max_new_tokens, ...)."""
        return self._seq.params

    @property
    def num_output(self) -> int:
        """Tokens generated so far."""
        return len(self._seq.out)

    @property
    def output(self) -> tuple[int, ...]:
        """The generated token ids (a copy)."""
        return tuple(self._seq.out)

    @property
    def last_token(self) -> int:
        """The newest token (the last prompt token before the first is sampled)."""
        return self._seq.out[-1] if self._seq.out else self._seq.prompt[-1]

    @property
    def position(self) -> int:
        """Position of `last_token`: the next forward feeds it there."""
        return len(self._seq.prompt) + len(self._seq.out) - 1

    @property
    def finished(self) -> bool:
        """Whether the sequence has stopped (EOS, a stop token or string, or its length budget)."""
        return self._seq.finish is not None


@runtime_checkable
class DecodeStrategy(Protocol):
    """Replaces the engine's one-token decode step (returned by a plugin's ``pre_rollout``).

    Called by the engine's scheduler on its asyncio loop; inside ``torch.inference_mode``.
    """

    def decode_step(self, engine: Engine, seqs: list[SequenceView]) -> None:
        """Advance every running sequence of ``seqs`` by at least one token, each through
        ``engine.accept(seq, tokens, log_probs, routes)``. The step may stay in flight and be settled at
        the next call (the engine calls again while any sequence runs)."""
        ...

    def finished(self, seq: SequenceView) -> dict[str, float]:
        """Per-sequence statistics, handed out as ``EngineOutput.spec_info`` when ``seq`` retires."""
        ...


def filter_flags(seqs: Sequence[SequenceView | _Seq]) -> dict[str, bool]:
    """Whether any of these sequences samples with top-k / top-p (the sampler skips each filter, and
    the host sync that would find out, when none does)."""
    params = [s.sampling if isinstance(s, SequenceView) else s.params for s in seqs]
    return {
        "use_top_k": any(p.top_k > 0 for p in params),
        "use_top_p": any(p.top_p < 1 for p in params),
    }


def graph_safe(model: torch.nn.Module) -> bool:
    """Whether every module of ``model`` can run inside a CUDA graph: a module that cannot (e.g. one
    that reads a device value back to the host) declares ``cuda_graph_safe = False`` (a class attribute
    or a property)."""
    return all(getattr(m, "cuda_graph_safe", True) for m in model.modules())
