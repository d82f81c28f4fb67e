"""Token sampling for the rollout engine: temperature, top-k, top-p, greedy, per row.

`rollout_log_probs` are the log-probabilities of the sampled tokens under the tempered distribution
(logits / temperature, before top-k/top-p truncation), which is what the trainer recomputes.
Greedy rows (temperature 0) report log-probs at temperature 1.

The engine draws with keyed noise: the exponential race below, with each (sequence key, token index,
vocabulary id) hashed to its own uniform (a counter-based generator). A sequence's samples then do not
depend on which other sequences share its batch, on the graph bucket it runs in, or on whether the step
ran eagerly, captured or compiled; a seeded engine repeats its samples exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miles_core.model.batch_invariant import token_log_probs


@dataclass
class SamplingParams:
    """SGLang-style sampling parameters of one request."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    sampling_seed: int | None = None  # fixes the request's sampling key (same seed, same tokens)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("stop", "stop_token_ids"):
            v = known.get(key)
            if v is None:
                known.pop(key, None)
            elif isinstance(v, str):
                known[key] = (v,)
            else:
                known[key] = tuple(v)
        return cls(**known)


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values < 2**32 (multipliers < 2**31, so the
    products never overflow int64 and every shift is a logical one)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def keyed_exponentials(key: torch.Tensor, index: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 ``[B, vocab]`` Exp(1) draws, a pure function of (key[b], index[b], vocabulary id).

    `key` (int64 ``[B]``) is a per-sequence random 31-bit integer, `index` the position of the token
    being drawn. Each hash keeps 24 bits, mapped to the open interval (0, 1) before the logarithm.
    """
    row = _mix32(_mix32(key & _M32) ^ ((index * 0x9E3779B1) & _M32))
    ids = torch.arange(vocab, device=key.device, dtype=torch.long)
    x = _mix32(row.unsqueeze(-1) ^ ((ids * 0x2545F491) & _M32))
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(u)


def tempered_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    use_top_k: bool | None = None,
    use_top_p: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scaled, masked, greedy)``: fp32 ``logits / temperature`` (1 for greedy rows), the same with the
    tokens outside each row's top-k / top-p set to -inf (softmax of it is what `sample_tokens` draws
    from), and the bool ``[B]`` greedy rows. Arguments as in `sample_tokens`."""
    logits = logits.float()
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    scaled = logits / temp
    masked = scaled
    if use_top_k is None:
        use_top_k = bool((top_k > 0).any())
    if use_top_p is None:
        use_top_p = bool((top_p < 1).any())
    if use_top_k:
        vocab = logits.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = torch.sort(masked, dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if use_top_p:
        sorted_logits, order = torch.sort(masked, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (always keep the first).
        drop = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        masked = torch.full_like(masked, float("-inf")).scatter(-1, order, sorted_logits)
    return scaled, masked, greedy


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generator: torch.Generator | None,
    *,
    use_top_k: bool | None = None,
    use_top_p: bool | None = None,
    noise_key: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    :param logits: float ``[B, V]`` next-token logits.
    :param temperature: float32 ``[B]``; 0 means greedy.
    :param top_p: float32 ``[B]`` in (0, 1].
    :param top_k: int64 ``[B]``; <= 0 means no limit.
    :param use_top_k: whether any row has top_k > 0 (callers that know it on the host pass it, which
        saves a device-to-host sync; None checks the tensor).
    :param use_top_p: whether any row has top_p < 1, likewise.
    :param noise_key: ``(key, index)`` int64 ``[B]`` each: draw with `keyed_exponentials` (no generator,
        no host sync, capturable and compilable). None draws from `generator` instead.
    :returns: ``(tokens int64 [B], log_probs float32 [B])``.
    """
    scaled, masked, greedy = tempered_logits(logits, temperature, top_p, top_k, use_top_k, use_top_p)
    probs = torch.softmax(masked, dim=-1)
    if noise_key is not None:
        # argmax(p / E) with E ~ Exp(1) draws from p exactly (the exponential race): one elementwise
        # pass and an argmax, free of host syncs (and of torch.multinomial's V exponentials a call).
        sampled = (probs / keyed_exponentials(*noise_key, probs.shape[-1])).argmax(-1)
    elif probs.is_cuda:
        race = torch.empty_like(probs).exponential_(generator=generator)
        sampled = (probs / race).argmax(-1)
    else:
        sampled = _inverse_cdf(probs, torch.rand(probs.shape[0], generator=generator))
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    # The trainer's --true-on-policy-mode recomputes them with the same function.
    return tokens, token_log_probs(scaled, tokens)


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Row i's first token whose cumulative probability exceeds uniform[i] * total mass (one uniform a
    row: on CPU ~15x cheaper than drawing V exponentials for torch.multinomial)."""
    cdf = probs.cumsum(-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    # A rounding edge (target at the very top of the CDF) could land on a zero-probability tail token.
    ok = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) > 0
    return torch.where(ok, tok, probs.argmax(-1))
