"""pg-loss reducers for ``--custom-pg-loss-reducer-function-path`` (``protocols.PgLossReducerFactory``):
Dr. GRPO's constant normaliser, shipped as the documented example.

A factory gets the micro-batch's ``(total_lengths, response_lengths, loss_masks,
calculate_per_token_loss)`` and returns a function from the flat per-token ``pg_loss [num_tokens]`` to
the micro-batch's *sum* over samples (or tokens); the trainer divides it by the optimizer step's sample
(or token) count, as slime's Megatron scaling does. The default reducer sums each sample's masked mean.

Dr. GRPO (arXiv 2503.20783) replaces each sample's division by its own length with a constant, so long
responses are not down-weighted per token::

    --custom-pg-loss-reducer-function-path miles_core.train.reducers:get_pg_loss_reducer

divides by 1000 (miles' example's constant); ``constant_normaliser(n)`` builds one for another ``n``,
e.g. ``get_pg_loss_reducer = constant_normaliser(4096)`` in your own ``reducer.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def constant_normaliser(divisor: float) -> Callable[..., Reducer]:
    """A reducer factory dividing each sample's masked token sum by ``divisor`` (not by its length); with
    ``--calculate-per-token-loss`` it returns the plain masked token sum (slime's Dr. GRPO example)."""
    if divisor <= 0:
        raise ValueError(f"the Dr. GRPO divisor must be positive, got {divisor}")

    def factory(
        total_lengths: list[int],
        response_lengths: list[int],
        loss_masks: list[torch.Tensor],
        calculate_per_token_loss: bool = False,
    ) -> Reducer:
        mask = torch.cat([m.float() for m in loss_masks]) if loss_masks else torch.zeros(0)
        scale = 1.0 if calculate_per_token_loss else 1.0 / divisor

        def reduce(x: torch.Tensor) -> torch.Tensor:
            if x.numel() != mask.numel():
                raise ValueError(f"the reducer got {x.numel()} values for {mask.numel()} response tokens")
            return (x * mask.to(x.device)).sum() * scale

        return reduce

    return factory


get_pg_loss_reducer = constant_normaliser(1000.0)
