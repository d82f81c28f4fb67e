"""Grouping samples by token count: into micro-batches of a token budget (``--use-dynamic-batch-size``)
and across data-parallel trainer ranks. Both are plain functions of the lengths, so every rank computes
the same answer without talking to the others.
"""

from __future__ import annotations

from miles_core.errors import UsageError


def pack_by_tokens(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group positions of `lengths` into bins of at most `max_tokens` tokens (first-fit decreasing).

    A sequence longer than the budget gets a bin of its own. Inside a bin, sequences are ordered by
    length so that runs of equal lengths are contiguous (the varlen attention fallback batches them).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def balance_by_tokens(lengths: list[int], world_size: int) -> list[list[int]]:
    """Split positions of `lengths` among `world_size` ranks with near-equal token sums.

    Longest first, each to the rank with the fewest tokens so far (then the fewest samples, then the
    lowest rank), so every rank gets at least one sample. Each rank's positions are returned in
    ascending order. Deterministic: the same lengths give every rank the same split.

    :raises UsageError: when there are fewer samples than ranks.
    """
    if len(lengths) < world_size:
        raise UsageError(
            f"a train step has {len(lengths)} samples for {world_size} trainer ranks; raise "
            f"--global-batch-size to at least {world_size} so that every rank gets one."
        )
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]
