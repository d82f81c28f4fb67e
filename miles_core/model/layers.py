"""Dense building blocks of the decoder: RMSNorm, rotary embedding, attention (with KV cache) and SwiGLU MLP.

Every projection is a plain `nn.Linear` submodule named as in HF checkpoints (`q_proj`, `gate_proj`, ...), so
parameter names map 1:1 onto HF tensor names and a plugin can swap any single projection for its own module.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from miles_core.model import batch_invariant, invariant_fused, varlen_attention
from miles_core.model.config import ModelConfig
from miles_core.model.decode_attention import decode_attention
from miles_core.model.kv_cache import KVCache

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight multiply, as HF does (bitwise-comparable)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.batch_invariant = False  # --true-on-policy-mode: `batch_invariant.rms_norm`

    def fused(self, x: torch.Tensor) -> bool:
        """Whether this norm runs the mode's fused Triton kernels (`invariant_fused`) on x."""
        return self.batch_invariant and invariant_fused.available(x)

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h + delta, self(h + delta))``: with `fused`, one kernel for the residual add and the norm."""
        if self.fused(h):
            return invariant_fused.add_rms_norm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.batch_invariant:
            if invariant_fused.available(x):
                return invariant_fused.add_rms_norm(x, None, self.weight, self.eps)
            return self.weight * batch_invariant.rms_norm(x, self.eps).to(dtype)
        # The fused kernel computes x * rsqrt(mean(x^2) + eps) in fp32 in one pass (was 6 ops).
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """fp32 [head_dim/2] inverse frequencies, including linear / llama3 scaling."""
    dim = config.head_dim
    inv = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = config.rope_scaling or {}
    rope_type = config.rope_type
    if rope_type == "linear":
        inv = inv / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given absolute positions. The frequencies are a plain attribute, not a buffer, so
    a model built on the meta device needs no re-initialisation and checkpoints carry no rope tensors."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self._inv_freq = rope_inv_freq(config)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != position_ids.device:
            self._inv_freq = self._inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


@dataclass
class StepContext:
    """Per-forward tensors shared by all layers (computed once in `CausalLM.forward`)."""

    cos: torch.Tensor  # [B, T, head_dim]
    sin: torch.Tensor
    kv_cache: KVCache | None = None
    cache_slots: torch.Tensor | None = None  # long [B]
    position_ids: torch.Tensor | None = None  # long [B, T], absolute positions
    kv_len: int = 0  # keys 0..kv_len-1 of each slot are visible to some query
    mask: torch.Tensor | None = None  # bool [B, 1, T, kv_len], True = attend
    # Row b is cache slot b (slots 0..B-1): keys are read as a view of the cache, with no gather.
    contiguous_slots: bool = False
    # Packed rows: input [1, sum(seq_lens)] holds several sequences back to back, each causal on its own.
    seq_lens: list[int] | None = None
    cu_seqlens: torch.Tensor | None = None  # int32 [len(seq_lens) + 1] on the device
    max_seqlen: int = 0  # max(seq_lens)
    # Kernel for packed bf16/fp16 attention on this device (`packed_attention_kernel`): "triton",
    # "flash", or None (SDPA per run of equal lengths).
    packed_kernel: str | None = None
    # One token per row over the cache: write K/V and attend in one kernel (`decode_attention`).
    decode_kernel: bool = False


class _FlashVarlen(torch.autograd.Function):
    """Causal flash attention over packed sequences (``cu_seqlens``), K/V with their own (fewer) heads:
    the flash kernels do grouped-query attention natively, so K/V are never repeated per query head
    (`torch.nn.attention.varlen.varlen_attn` before torch 2.13 had no GQA option). q/k/v
    ``[total, heads, D]``."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng, unused)
        ctx.max_len = max_len
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, rng, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, rng, unused
        )
        return dq, dk, dv, None, None


# Masked attention over the KV cache (prefill) on CUDA, without cuDNN's kernel: cuDNN builds a plan for
# every new shape (~2 ms a layer on an H100), and prefill shapes change with each set of arriving prompts
# (`miles serve`: 57 prompts took 66 ms against 24 ms without it).
_CACHE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _masked_sdpa(q, k, v, mask):
    if q.is_cuda and not torch.compiler.is_compiling():
        with sdpa_kernel(_CACHE_SDPA):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_KERNEL_OK: dict[tuple[str, str, int], bool] = {}  # (kernel, device, head_dim) -> runs there
PACKED_KERNELS = ("triton", "flash", "sdpa")


def _kernel_runs(kernel: str, device: torch.device, head_dim: int) -> bool:
    """Whether `kernel`'s packed attention runs on `device`: tried once on a tiny bf16 input, outside
    any compiled region."""
    key = (kernel, str(device), head_dim)
    if key not in _KERNEL_OK:
        ok = device.type == "cuda" and (kernel != "triton" or varlen_attention.supports(head_dim))
        if ok:
            fn = varlen_attention.VarlenAttention if kernel == "triton" else _FlashVarlen
            try:
                x = torch.zeros(2, 2, head_dim, device=device, dtype=torch.bfloat16)
                cu = torch.tensor([0, 2], device=device, dtype=torch.int32)
                fn.apply(x, x[:, :1], x[:, :1], cu, 2)
            except Exception as e:  # noqa: BLE001 - any failure means: use the next kernel
                log.warning("%s packed attention is unavailable here (%s)", kernel, e)
                ok = False
        _KERNEL_OK[key] = ok
    return _KERNEL_OK[key]


def packed_attention_kernel(device: torch.device, head_dim: int, want: str = "auto") -> str | None:
    """The kernel for causal attention over packed bf16/fp16 sequences on `device`: the Triton kernels
    (`varlen_attention`; power-of-two head sizes), else torch's flash varlen (sm80+), else None (SDPA
    per run of equal lengths). ``want`` (``--packed-attention``) picks one of `PACKED_KERNELS` if it runs
    here (else SDPA); ``auto`` takes the first that runs."""
    if want != "auto" and want not in PACKED_KERNELS:
        raise ValueError(
            f"packed attention kernel {want!r}: choose auto or one of {', '.join(PACKED_KERNELS)}"
        )
    for kernel in [want] if want != "auto" else ["triton", "flash"]:
        if kernel != "sdpa" and _kernel_runs(kernel, device, head_dim):
            return kernel
    return None


class Attention(nn.Module):
    """Grouped-query attention with optional per-head q/k RMSNorm (Qwen3) and qkv bias (Qwen2)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, qd, kvd = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(h, qd, bias=qkv_bias)
        self.k_proj = nn.Linear(h, kvd, bias=qkv_bias)
        self.v_proj = nn.Linear(h, kvd, bias=qkv_bias)
        self.o_proj = nn.Linear(qd, h, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        # (weight, bias) of q/k/v stacked, set by `fuse_qkv`: the three weights are views into it.
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # --true-on-policy-mode: every path attends with `batch_invariant.attention` (`make_batch_invariant`).
        self.batch_invariant = False

    def fuse_qkv(self) -> bool:
        """Store the q/k/v projections in one buffer (each weight becomes a view into it), so the static
        decode step computes all three in one GEMM. Returns whether they are fused now; projections a
        plugin swapped for its own modules are left alone. Weight updates that copy into the weights
        (`load_hf_tensors`) update the fused buffer too; a weight replaced by a new tensor is re-fused
        by the next `fuse_qkv` (the decode graphs call it whenever the model's memory changed)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(p) is not nn.Linear for p in projs) or len({p.bias is None for p in projs}) != 1:
            self._qkv = None
            return False
        ws = [p.weight for p in projs]
        if self._qkv is not None and _are_views_of(ws, self._qkv[0]):
            bias = self._qkv[1]
            if bias is None or _are_views_of([p.bias for p in projs], bias):
                return True
        with torch.no_grad():
            weight = torch.cat([w.detach() for w in ws])
            bias = None if projs[0].bias is None else torch.cat([p.bias.detach() for p in projs])
            for i, p in enumerate(projs):
                rows = slice(sum(w.shape[0] for w in ws[:i]), sum(w.shape[0] for w in ws[: i + 1]))
                p.weight.data = weight[rows]
                if bias is not None:
                    p.bias.data = bias[rows]
        self._qkv = (weight, bias)
        return True

    def _project(self, x: torch.Tensor, ctx: StepContext, joined: bool):
        """(q, k, v) projections of x, or with `joined` one [..., (H + 2 Hkv) D] tensor of them."""
        if self._qkv is not None and ctx.contiguous_slots:  # the static decode step
            qkv = F.linear(x, *self._qkv)
            qd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return qkv if joined else qkv.split([qd, kvd, kvd], dim=-1)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return torch.cat([q, k, v], dim=-1) if joined else (q, k, v)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        b, t, _ = x.shape
        if ctx.decode_kernel and not self.batch_invariant:  # norm, rope, cache write and attention in one op
            norm = self.q_norm is not None
            slots = ctx.cache_slots if t == 1 else ctx.cache_slots[:, None].expand(b, t).reshape(-1)
            out = decode_attention(
                self._project(x, ctx, joined=True).reshape(b * t, -1), ctx.cos.reshape(b * t, -1),
                ctx.sin.reshape(b * t, -1), self.q_norm.weight if norm else None,
                self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0, slots,
                ctx.position_ids.reshape(-1), ctx.kv_cache.key, self.layer_idx, self.num_heads,
                self.num_kv_heads, t > 1,
            )  # fmt: skip
            return self.o_proj(out.reshape(b, t, -1))
        q, k, v = self._project(x, ctx, joined=False)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        dt = q.dtype
        if self.batch_invariant and invariant_fused.available(q):  # q/k norm and rope: a kernel each
            norm = self.q_norm is not None
            eps = self.q_norm.eps if norm else 0.0
            q = invariant_fused.rope(q, self.q_norm.weight if norm else None, ctx.cos, ctx.sin, eps)
            k = invariant_fused.rope(k, self.k_norm.weight if norm else None, ctx.cos, ctx.sin, eps)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            # Under autocast the projections are bf16 while norms and rope tables are fp32; keep q/k in
            # the projection dtype so attention runs its bf16 kernels (a no-op without autocast).
            cos, sin = ctx.cos.to(dt), ctx.sin.to(dt)
            q = apply_rope(q.to(dt).transpose(1, 2), cos, sin)
            k = apply_rope(k.to(dt).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if ctx.kv_cache is not None:
            k, v = self._cache_step(k, v, ctx)
            if self.batch_invariant:
                out = batch_invariant.attention(q, k, v, ctx.position_ids)
            else:
                out = self._grouped_sdpa(q, k, v, ctx.mask)
        elif self.batch_invariant:
            out = self._invariant(q, k, v, ctx)
        elif ctx.cu_seqlens is not None:
            if ctx.packed_kernel and q.dtype in (torch.bfloat16, torch.float16):
                # Inside a compiled layer too (no graph break): only cu_seqlens and max_seqlen, whose
                # values change per micro-batch, reach the kernel, so nothing recompiles.
                fn = varlen_attention.VarlenAttention if ctx.packed_kernel == "triton" else _FlashVarlen
                out = fn.apply(
                    q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), ctx.cu_seqlens,
                    ctx.max_seqlen,
                ).transpose(0, 1)[None]  # fmt: skip
            else:
                out = self._packed(q, k, v, ctx)
        else:
            out = F.scaled_dot_product_attention(q, self._expand(k), self._expand(v), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _grouped_sdpa(self, q, k, v, mask: torch.Tensor) -> torch.Tensor:
        """Masked attention with GQA done by folding each KV head's query heads into the query length:
        q [B, H, T, D] -> [B, Hkv, rep*T, D], so K/V are read once instead of being copied rep times."""
        b, _, t, d = q.shape
        rep = self.num_heads // self.num_kv_heads
        if rep == 1:
            return _masked_sdpa(q, k, v, mask)
        qg = q.reshape(b, self.num_kv_heads, rep * t, d)
        mg = mask if t == 1 else mask.repeat(1, 1, rep, 1)  # [B, 1, rep*T, L], rows ordered (rep, T)
        out = _masked_sdpa(qg, k, v, mg)
        return out.reshape(b, self.num_heads, t, d)  # fp32 kernels may return another layout

    # Outside torch.compile: the packing (sequence lengths) changes every micro-batch and would
    # recompile a compiled layer each time; the layer's other ops compile around this call.
    @torch.compiler.disable
    def _packed(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        """Causal attention within each packed sequence (q/k/v [1, heads, total, D]) without the flash
        kernels: batched SDPA per run of equal lengths."""

        # Fallback: runs of equal-length sequences are contiguous, so each run is one batched SDPA call
        # on a zero-copy view (the trainer packs sequences sorted by length).
        def sdpa(qs, ks, vs):
            return F.scaled_dot_product_attention(qs, self._expand(ks), self._expand(vs), is_causal=True)

        return self._by_runs(q, k, v, ctx.seq_lens, sdpa)

    def _by_runs(self, q, k, v, lens: list[int], attend) -> torch.Tensor:
        """``attend(q, k, v)`` ([n, heads, length, D] each, causal) over each run of n packed sequences of
        one length; q/k/v and the result [1, heads, total, D]."""
        outs, start, i = [], 0, 0
        while i < len(lens):
            j = i
            while j < len(lens) and lens[j] == lens[i]:
                j += 1
            n, length = j - i, lens[i]
            sl = slice(start, start + n * length)
            o = attend(*(_runs(x, sl, n, length) for x in (q, k, v)))
            outs.append(o.transpose(0, 1).reshape(self.num_heads, n * length, -1))
            start += n * length
            i = j
        return torch.cat(outs, dim=1).unsqueeze(0)

    def _invariant(self, q, k, v, ctx: StepContext) -> torch.Tensor:
        """`batch_invariant.attention` without a cache: over the padded rows (queries at 0..T-1), or over
        each run of equal-length packed sequences."""

        def attend(qs, ks, vs):
            n, _, t, _ = qs.shape
            return batch_invariant.attention(qs, ks, vs, torch.arange(t, device=qs.device).expand(n, t))

        return attend(q, k, v) if ctx.seq_lens is None else self._by_runs(q, k, v, ctx.seq_lens, attend)

    def _cache_step(self, k: torch.Tensor, v: torch.Tensor, ctx: StepContext):
        """Write this step's K/V at [slot, :, position], then read each slot's keys 0..kv_len-1."""
        kc, vc = ctx.kv_cache.k[self.layer_idx], ctx.kv_cache.v[self.layer_idx]
        slots, pos = ctx.cache_slots, ctx.position_ids
        if self.batch_invariant and invariant_fused.available(k):  # both writes in one kernel
            invariant_fused.cache_write(k, v, kc, vc, slots, pos)
        else:
            # Advanced indices around a slice put the indexed dims first: the target view is [B, T, Hkv, D].
            kc[slots[:, None], :, pos] = k.transpose(1, 2).to(kc.dtype)
            vc[slots[:, None], :, pos] = v.transpose(1, 2).to(vc.dtype)
        if ctx.contiguous_slots:
            b = k.shape[0]
            return kc[:b, :, : ctx.kv_len].to(k.dtype), vc[:b, :, : ctx.kv_len].to(v.dtype)
        return kc[slots, :, : ctx.kv_len].to(k.dtype), vc[slots, :, : ctx.kv_len].to(v.dtype)

    def _expand(self, kv: torch.Tensor) -> torch.Tensor:
        rep = self.num_heads // self.num_kv_heads
        return kv if rep == 1 else kv.repeat_interleave(rep, dim=1)


def _are_views_of(parts: list[torch.Tensor], whole: torch.Tensor) -> bool:
    """Whether `parts` are, in order, the consecutive row blocks of `whole`."""
    ptr, step = whole.data_ptr(), whole.element_size() * whole.stride(0)
    for p in parts:
        if p.data_ptr() != ptr or p.dtype != whole.dtype or p.stride() != whole.stride():
            return False
        ptr += step * p.shape[0]
    return ptr == whole.data_ptr() + step * whole.shape[0]


def fuse_qkv(model: nn.Module) -> int:
    """`Attention.fuse_qkv` on every attention module of `model`; returns how many are fused."""
    return sum(m.fuse_qkv() for m in model.modules() if isinstance(m, Attention))


def _runs(x: torch.Tensor, sl: slice, n: int, length: int) -> torch.Tensor:
    """[1, heads, total, D] -> [n, heads, length, D]: n back-to-back sequences of one length."""
    return x[0, :, sl].reshape(x.shape[1], n, length, -1).transpose(0, 1)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.batch_invariant = False  # --true-on-policy-mode: `batch_invariant.silu_mul`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            silu_mul = invariant_fused.silu_mul if invariant_fused.available(x) else batch_invariant.silu_mul
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
