"""One-token decode attention over the KV cache in one Triton kernel (flash-decoding without a split).

A decode step's attention is, per layer: write the new token's K/V into the cache at its position, then
attend over that slot's keys ``0..pos``. Done with plain ops that is two scatter kernels, a mask, and a
masked SDPA over every slot's first ``kv_len`` keys (under ``torch.compile`` the cache read also became a
copy). `decode_attention` does it in one kernel, one program per (row, KV head):

1. store the row's new K/V at ``cache[slot, head, pos]``;
2. stream the cached keys ``0..pos-1`` of that slot and head in blocks, with an online softmax for the
   head's ``rep`` query heads (GQA: each K/V block is read once for all of them), and finish with the
   new key, taken from registers rather than read back.

Each row reads only its own ``pos`` keys, so there is no mask and no ``kv_len`` padding; the grid is
static, so the kernel can be captured in a CUDA graph. It is registered as the custom op
``miles::decode_attention``, and it addresses the cache by its key (`KVCache.key`) and layer rather than
taking the buffers as arguments: a compiled decode step then calls it as one opaque op and never sees
the cache as a tensor it mutates. (Declared as a mutated argument, the cache was copied whole by the
compiled step every layer, which cost more than the attention.) Nothing else in a decode step touches the
cache, so there is no ordering for the compiler to keep.

Without triton (or off CUDA, outside Triton's interpreter) the op runs the same computation with torch
ops (`_reference`), which is what CPU tests compare the kernel against.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from miles_core.model.kv_cache import cache_by_key

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install
    triton = None
    tl = None

BLOCK_KEYS = 64
# Whether forwards over the KV cache use the kernel for one-token steps where it can run (tests turn it
# off to compare with the masked-SDPA path).
ENABLED = True


def kernel_available(x: torch.Tensor, head_dim: int | None = None) -> bool:
    """Whether the Triton kernel runs on `x`'s device (CUDA, or the interpreter on CPU), for heads of
    `head_dim` (a power of two >= 16, as ``tl.arange`` and ``tl.dot`` need)."""
    if triton is None or (head_dim is not None and (head_dim < 16 or head_dim & (head_dim - 1))):
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_for_decode(x: torch.Tensor, head_dim: int) -> bool:
    """Whether a one-token forward over the cache on `x`'s device should run `decode_attention`."""
    return ENABLED and kernel_available(x, head_dim)


if triton is not None:

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, out_ptr,
        sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_s, sc_h, sc_l, so_b, so_h, scale,
        REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        d = tl.arange(0, D)
        r = tl.arange(0, REP_P)
        r_ok = r < REP
        heads = h * REP + r
        cdt = kc_ptr.dtype.element_ty
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=r_ok[:, None], other=0.0)
        q = q.to(cdt)
        base = slot * sc_s + h * sc_h
        k_new = tl.load(k_ptr + b * sk_b + h * sk_h + d).to(cdt)
        v_new = tl.load(v_ptr + b * sv_b + h * sv_h + d).to(cdt)
        tl.store(kc_ptr + base + pos * sc_l + d, k_new)
        tl.store(vc_ptr + base + pos * sc_l + d, v_new)
        # The new key first (it is always visible): it starts the running max and sum.
        m_i = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale  # [REP_P]
        l_i = tl.full((REP_P,), 1.0, tl.float32)
        acc = tl.zeros((REP_P, D), tl.float32) + v_new.to(tl.float32)[None, :]
        for start in range(0, pos, BLOCK):
            n = start + tl.arange(0, BLOCK)
            n_ok = n < pos
            kv_off = base + n[:, None] * sc_l + d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [REP_P, BLOCK]
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(vc_ptr + kv_off, mask=n_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdt), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptr = out_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


def _reference(q, k, v, k_cache, v_cache, slots, pos) -> torch.Tensor:
    """The op with torch ops: write K/V, then masked attention over keys 0..pos of each row's slot."""
    b, heads, d = q.shape
    kv_heads = k.shape[1]
    k_cache[slots, :, pos] = k.to(k_cache.dtype)
    v_cache[slots, :, pos] = v.to(v_cache.dtype)
    kv_len = int(pos.max()) + 1
    keys = k_cache[slots, :, :kv_len].to(q.dtype)
    vals = v_cache[slots, :, :kv_len].to(q.dtype)
    mask = torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None]  # [B, L]
    rep = heads // kv_heads
    qg = q.view(b, kv_heads, rep, d)  # each KV head's query heads as its query rows
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask[:, None, None, :])
    return out.reshape(b, heads, d)


@torch.library.custom_op("miles::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
    cache_key: int, layer: int,
) -> torch.Tensor:  # fmt: skip
    """Attention of one new token per row over its slot's cache, writing the token's K/V first.

    :param q: ``[B, H, D]`` queries (rope applied); ``k``, ``v``: ``[B, Hkv, D]`` the new keys/values.
    :param slots: long ``[B]`` cache slot of each row; ``pos``: long ``[B]`` the new token's position.
    :param cache_key: `KVCache.key` of the cache; ``layer``: the decoder layer, whose ``k[layer]`` /
        ``v[layer]`` (``[slots, Hkv, L, D]``) get the new K/V at ``[slots[b], :, pos[b]]``, in place.
    :returns: ``[B, H, D]`` in q's dtype: softmax(q k^T / sqrt(D)) v over keys ``0..pos[b]``.
    """
    cache = cache_by_key(cache_key)
    return attend(q, k, v, cache.k[layer], cache.v[layer], slots, pos)


@decode_attention.register_fake
def _(q, k, v, slots, pos, cache_key, layer):
    return q.new_empty(q.shape)


def attend(q, k, v, k_cache, v_cache, slots, pos) -> torch.Tensor:
    """`decode_attention` on explicit cache buffers (the kernel where it runs, else `_reference`)."""
    if not kernel_available(q, q.shape[-1]):
        return _reference(q, k, v, k_cache, v_cache, slots, pos)
    b, heads, d = q.shape
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    out = q.new_empty(q.shape)
    if b == 0:
        return out
    for t in (k_cache, v_cache):
        if t.stride(-1) != 1 or t.stride() != k_cache.stride():
            raise ValueError("decode_attention needs K/V caches with the same, last-dim-contiguous layout")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    slots, pos = slots.contiguous(), pos.contiguous()
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"
    _decode_attn_kernel[(b, kv_heads)](
        q, k, v, k_cache, v_cache, slots, pos, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1),
        1.0 / math.sqrt(d),
        REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=d, BLOCK=BLOCK_KEYS, PRECISION=precision,
    )  # fmt: skip
    return out
