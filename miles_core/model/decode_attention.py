"""Decode attention over the KV cache in one Triton kernel (flash-decoding without a split).

A decode step's attention is, per layer: q/k RMSNorm (Qwen3), rotary embedding, write the new token's K/V
into the cache at its position, then attend over that slot's keys ``0..pos``. Done with plain ops that is
a fused norm/rope kernel, two scatter kernels, a mask and a masked SDPA over every slot's first
``kv_len`` keys. `decode_attention` does all of it in one kernel, one program per (row, KV head), reading
the row's q/k/v straight from the projection output:

1. q/k RMSNorm and rope of the head's ``rep`` query heads and its key, in fp32, rounded to the cache dtype;
2. store the new K/V at ``cache[slot, head, pos]``;
3. stream the cached keys ``0..pos-1`` of that slot and head in blocks, with an online softmax over the
   ``rep`` query heads (GQA: each K/V block is read once for all of them), and finish with the new key,
   taken from registers rather than read back.

A forward with a few new tokens per row (up to `MAX_TOKENS`: a speculative verify or draft step) is
flattened to one row per token, several rows sharing a slot (``multi_token``). Each such row must see
the keys of its sequence's earlier new tokens, so the kernel then runs twice: a launch that only does
steps 1-2 for every row, then one that does 1 and 3.

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
# Forwards over the cache with up to this many new tokens a row use the op (speculative verify and draft
# steps: a few tokens a row); longer ones (prefill) use masked SDPA, which tiles the queries.
MAX_TOKENS = 8
# Whether forwards over the KV cache use the kernel for one-token steps where it can run (tests turn it
# off to compare with the masked-SDPA path).
ENABLED = True


def kernel_available(x: torch.Tensor, head_dim: int | None = None) -> bool:
    """Whether the Triton kernel runs on `x`'s device (CUDA, or the interpreter on CPU), for heads of
    `head_dim` (a power of two >= 32: ``tl.arange`` needs powers of two, and the kernel's dots run over
    half-heads of at least 16)."""
    if triton is None or (head_dim is not None and (head_dim < 32 or head_dim & (head_dim - 1))):
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_for_decode(x: torch.Tensor, head_dim: int) -> bool:
    """Whether a one-token forward over the cache on `x`'s device should run `decode_attention`."""
    return ENABLED and kernel_available(x, head_dim)


if triton is not None:

    @triton.jit
    def _norm_rope(xa, xb, w_ptr, c, sn, eps, D: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
                   CDT: tl.constexpr):  # fmt: skip
        """RMSNorm (as `RMSNorm`: normalise in fp32, round, scale by the weight) and rope of rows given
        as halves xa, xb [R, HALF] (fp32); returns the rotated halves rounded to CDT, as fp32."""
        if QK_NORM:
            var = (tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D
            r = 1.0 / tl.sqrt(var + eps)
            h = tl.arange(0, HALF)
            wa = tl.load(w_ptr + h).to(tl.float32)
            wb = tl.load(w_ptr + HALF + h).to(tl.float32)
            xa = ((xa * r[:, None]).to(CDT).to(tl.float32) * wa[None, :]).to(CDT).to(tl.float32)
            xb = ((xb * r[:, None]).to(CDT).to(tl.float32) * wb[None, :]).to(CDT).to(tl.float32)
        # rotate_half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); cos/sin repeat over the two halves.
        ya = (xa * c[None, :] - xb * sn[None, :]).to(CDT)
        yb = (xb * c[None, :] + xa * sn[None, :]).to(CDT)
        return ya, yb

    @triton.jit
    def _decode_attn_kernel(
        qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr, out_ptr,
        s_qkv, s_cs, sc_s, sc_h, sc_l, so_b, so_h, scale, eps,
        H: tl.constexpr, HKV: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
        HALF: tl.constexpr, BLOCK: tl.constexpr, QK_NORM: tl.constexpr, PRECISION: tl.constexpr,
        STORE: tl.constexpr, ATTEND: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int64)
        cdt = kc_ptr.dtype.element_ty
        dh = tl.arange(0, HALF)
        d = tl.arange(0, D)
        r = tl.arange(0, REP_P)
        r_ok = r < REP
        heads = h * REP + r
        row = qkv_ptr + b * s_qkv  # [q heads | k heads | v heads] of this row, head_dim each
        q_off = heads[:, None] * D + dh[None, :]
        qa = tl.load(row + q_off, mask=r_ok[:, None], other=0.0).to(tl.float32)
        qb = tl.load(row + HALF + q_off, mask=r_ok[:, None], other=0.0).to(tl.float32)
        k_row = row + (H + h) * D
        ka = tl.load(k_row + dh).to(tl.float32)[None, :]
        kb = tl.load(k_row + HALF + dh).to(tl.float32)[None, :]
        v_new = tl.load(row + (H + HKV + h) * D + d).to(cdt)
        c = tl.load(cos_ptr + b * s_cs + dh).to(tl.float32)
        sn = tl.load(sin_ptr + b * s_cs + dh).to(tl.float32)
        qa, qb = _norm_rope(qa, qb, qw_ptr, c, sn, eps, D, HALF, QK_NORM, cdt)
        ka, kb = _norm_rope(ka, kb, kw_ptr, c, sn, eps, D, HALF, QK_NORM, cdt)
        base = slot * sc_s + h * sc_h
        new = base + pos * sc_l
        if STORE:
            tl.store(kc_ptr + new + dh[None, :], ka)
            tl.store(kc_ptr + new + HALF + dh[None, :], kb)
            tl.store(vc_ptr + new + d, v_new)
        if ATTEND:
            # The new key first (it is always visible): it starts the running max and sum.
            m_i = tl.sum(qa.to(tl.float32) * ka.to(tl.float32), axis=1)
            m_i = (m_i + tl.sum(qb.to(tl.float32) * kb.to(tl.float32), axis=1)) * scale  # [REP_P]
            l_i = tl.full((REP_P,), 1.0, tl.float32)
            acc = tl.zeros((REP_P, D), tl.float32) + v_new.to(tl.float32)[None, :]
            for start in range(0, pos, BLOCK):
                n = start + tl.arange(0, BLOCK)
                n_ok = n < pos
                off = base + n[:, None] * sc_l
                k_a = tl.load(kc_ptr + off + dh[None, :], mask=n_ok[:, None], other=0.0)
                k_b = tl.load(kc_ptr + off + HALF + dh[None, :], mask=n_ok[:, None], other=0.0)
                s = tl.dot(qa, tl.trans(k_a), input_precision=PRECISION)
                s = (s + tl.dot(qb, tl.trans(k_b), input_precision=PRECISION)) * scale  # [REP_P, BLOCK]
                s = tl.where(n_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                v = tl.load(vc_ptr + off + d[None, :], mask=n_ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(cdt), v, input_precision=PRECISION)
                l_i = l_i * alpha + tl.sum(p, axis=1)
                m_i = m_new
            out = acc / l_i[:, None]
            o_ptr = out_ptr + b * so_b + heads[:, None] * so_h + d[None, :]
            tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])


def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    if w is None:
        return x
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, D]; cos/sin [B, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def _reference(qkv, cos, sin, q_norm_w, k_norm_w, eps, k_cache, v_cache, slots, pos, num_heads, num_kv_heads):
    """The op with torch ops, as `Attention` computes it: norm, rope, write every row's K/V, then masked
    attention over keys 0..pos of each row's slot (so rows sharing a slot see each other's earlier keys)."""
    b = qkv.shape[0]
    d = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    q, k, v = qkv.view(b, -1, d).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    dt = qkv.dtype
    q = _rope(_rms(q, q_norm_w, eps).to(dt), cos.to(dt), sin.to(dt))
    k = _rope(_rms(k, k_norm_w, eps).to(dt), cos.to(dt), sin.to(dt))
    k_cache[slots, :, pos] = k.to(k_cache.dtype)
    v_cache[slots, :, pos] = v.to(v_cache.dtype)
    kv_len = int(pos.max()) + 1
    keys = k_cache[slots, :, :kv_len].to(dt)
    vals = v_cache[slots, :, :kv_len].to(dt)
    mask = torch.arange(kv_len, device=qkv.device)[None, :] <= pos[:, None]  # [B, L]
    rep = num_heads // num_kv_heads
    qg = q.reshape(b, num_kv_heads, rep, d)  # each KV head's query heads as its query rows
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask[:, None, None, :])
    return out.reshape(b, num_heads, d)


@torch.library.custom_op("miles::decode_attention", mutates_args=())
def decode_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None, eps: float, slots: torch.Tensor, pos: torch.Tensor, cache_key: int,
    layer: int, num_heads: int, num_kv_heads: int, multi_token: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Attention of one new token per row over its slot's cache, writing the token's K/V first.

    With ``multi_token`` several rows may share a slot (a few new tokens of one sequence at consecutive
    positions, as a speculative verify step feeds them): every row's K/V is written first (one launch),
    then each row attends over its slot's keys 0..pos (a second launch).

    :param qkv: ``[B, (H + 2 Hkv) D]`` the q/k/v projections of each row's new token (before norm/rope).
    :param cos: ``[B, D]`` rope table at each row's position (and ``sin``), as `RotaryEmbedding` gives.
    :param q_norm_w: ``[D]`` q RMSNorm weight (and ``k_norm_w``), or None without q/k norm; ``eps``.
    :param slots: long ``[B]`` cache slot of each row; ``pos``: long ``[B]`` the new token's position.
    :param cache_key: `KVCache.key` of the cache; ``layer``: the decoder layer, whose ``k[layer]`` /
        ``v[layer]`` (``[slots, Hkv, L, D]``) get the new K/V at ``[slots[b], :, pos[b]]``, in place.
    :returns: ``[B, H, D]`` in qkv's dtype: softmax(q k^T / sqrt(D)) v over keys ``0..pos[b]``.
    """
    cache = cache_by_key(cache_key)
    args = (qkv, cos, sin, q_norm_w, k_norm_w, eps, cache.k[layer], cache.v[layer], slots, pos)
    return attend(*args, num_heads, num_kv_heads, multi_token)


@decode_attention.register_fake
def _(qkv, cos, sin, q_norm_w, k_norm_w, eps, slots, pos, cache_key, layer, num_heads, num_kv_heads,
      multi_token=False):  # fmt: skip
    d = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    return qkv.new_empty(qkv.shape[0], num_heads, d)


def attend(qkv, cos, sin, q_norm_w, k_norm_w, eps, k_cache, v_cache, slots, pos, num_heads, num_kv_heads,
           multi_token=False):  # fmt: skip
    """`decode_attention` on explicit cache buffers (the kernel where it runs, else `_reference`)."""
    b = qkv.shape[0]
    d = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    if not kernel_available(qkv, d):
        return _reference(qkv, cos, sin, q_norm_w, k_norm_w, eps, k_cache, v_cache, slots, pos,
                          num_heads, num_kv_heads)  # fmt: skip
    rep = num_heads // num_kv_heads
    out = qkv.new_empty(b, num_heads, d)
    if b == 0:
        return out
    for t in (k_cache, v_cache):
        if t.stride(-1) != 1 or t.stride() != k_cache.stride():
            raise ValueError("decode_attention needs K/V caches with the same, last-dim-contiguous layout")
    qkv, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (qkv, cos, sin))
    slots, pos = slots.contiguous(), pos.contiguous()
    norm = q_norm_w is not None
    qw, kw = (q_norm_w, k_norm_w) if norm else (cos, cos)  # unread without the norm
    # One launch writes and attends (each row reads only keys before its own, which earlier steps
    # wrote); rows sharing a slot need every write done first: a write-only launch, then attention.
    for store, attn in ((True, False), (False, True)) if multi_token else ((True, True),):
        _decode_attn_kernel[(b, num_kv_heads)](
            qkv, cos, sin, qw, kw, k_cache, v_cache, slots, pos, out,
            qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            out.stride(0), out.stride(1), 1.0 / math.sqrt(d), eps,
            H=num_heads, HKV=num_kv_heads, REP=rep, REP_P=max(16, triton.next_power_of_2(rep)), D=d,
            HALF=d // 2, BLOCK=BLOCK_KEYS, QK_NORM=norm,
            PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", STORE=store, ATTEND=attn,
        )  # fmt: skip
    return out
