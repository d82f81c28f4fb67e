"""`KVCache`: preallocated per-layer key/value buffers indexed by (slot, position).

The cache only stores tensors; which slot holds which sequence and how long it is are the engine's business.
A forward with a cache writes its K/V at the given absolute positions and reads keys 0..p for a query at p.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from miles_core.model.config import ModelConfig

_REGISTRY: weakref.WeakValueDictionary[int, KVCache] = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


def cache_by_key(key: int) -> KVCache:
    """The live `KVCache` whose `key` this is (ops that address the cache by key, see `KVCache.key`)."""
    cache = _REGISTRY.get(key)
    if cache is None:
        raise RuntimeError(f"no live KV cache has key {key}")
    return cache


class KVCache:
    """K and V buffers [num_slots, n_kv_heads, max_len, head_dim] per decoder layer, allocated once.

    Each cache has an integer `key`. The decode attention op (`decode_attention`) takes the key rather
    than the buffers, so a compiled step treats the cache as state outside its graph (as serving engines
    do): it is updated in place, never copied.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype = dtype
        shape = (num_slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.key = next(_NEXT_KEY)
        _REGISTRY[self.key] = self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.no_grad()
    def copy_slots(self, src: int | torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy positions [0, length) of slot `src` into every slot of `dst` (a prompt's prefix shared by its
        n samples). `src` may also be a LongTensor shaped like `dst`, pairing sources with destinations."""
        if length <= 0:
            return
        dst = torch.as_tensor(dst, dtype=torch.long, device=self.k[0].device).reshape(-1)
        src = torch.as_tensor(src, dtype=torch.long, device=dst.device).reshape(-1)
        for buf in self.k + self.v:
            # index_select first: the source rows are read before any destination row is written.
            buf[dst, :, :length] = buf[src, :, :length].expand(len(dst), -1, -1, -1)

    def reset(self) -> None:
        for buf in self.k + self.v:
            buf.zero_()
