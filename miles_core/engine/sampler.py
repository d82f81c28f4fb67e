"""Token sampling for the rollout engine: temperature, top-k, top-p, greedy, per row.

`rollout_log_probs` are the log-probabilities of the sampled tokens under the tempered distribution
(logits / temperature, before top-k/top-p truncation), which is what the trainer recomputes.
Greedy rows (temperature 0) report log-probs at temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    generator: torch.Generator | None,
    *,
    use_top_k: bool | None = None,
    use_top_p: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    :param logits: float ``[B, V]`` next-token logits.
    :param temperature: float32 ``[B]``; 0 means greedy.
    :param top_p: float32 ``[B]`` in (0, 1].
    :param top_k: int64 ``[B]``; <= 0 means no limit.
    :param use_top_k: whether any row has top_k > 0 (callers that know it on the host pass it, which
        saves a device-to-host sync; None checks the tensor).
    :param use_top_p: whether any row has top_p < 1, likewise.
    :returns: ``(tokens int64 [B], log_probs float32 [B])``.
    """
    logits = logits.float()
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    scaled = logits / temp
    log_probs_full = torch.log_softmax(scaled, dim=-1)
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
    probs = torch.softmax(masked, dim=-1)
    if probs.is_cuda:
        # argmax(p / E) with E ~ Exp(1) draws from p exactly (the exponential race): one elementwise
        # pass and an argmax, faster than torch.multinomial on the GPU and free of host syncs.
        race = torch.empty_like(probs).exponential_(generator=generator)
        sampled = (probs / race).argmax(-1)
    else:  # CPU keeps multinomial, so seeded CPU runs draw the same samples as before
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.where(greedy, logits.argmax(-1), sampled)
    return tokens, log_probs_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
