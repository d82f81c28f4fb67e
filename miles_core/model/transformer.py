"""`CausalLM`: the decoder-only transformer (dense or MoE) behind the built-in engine and trainer.

Module names mirror HF checkpoints (`model.layers.3.self_attn.q_proj`, `lm_head`, ...). Model classes are
looked up by `architectures[0]` in `MODEL_CLASSES`; a plugin can register another class under a new name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from miles_core.devices import to_device
from miles_core.model import decode_attention
from miles_core.model.config import ModelConfig
from miles_core.model.kv_cache import KVCache
from miles_core.model.layers import (
    MLP,
    Attention,
    RMSNorm,
    RotaryEmbedding,
    StepContext,
    packed_attention_kernel,
)
from miles_core.model.moe import Experts, RoutingState, SparseMoeBlock
from miles_core.types import UsageError


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] in the compute dtype
    hidden: torch.Tensor | None = None  # [B, T, H] after the final norm, when return_hidden


class LazyLogitsOutput(ModelOutput):
    """A `ModelOutput` whose full ``logits`` are computed from ``hidden`` only if someone reads them.

    The trainer computes logits at response positions only; a hook that still reads ``.logits`` gets the
    same tensor a plain forward returns (built on first access, then kept).
    """

    def __init__(self, hidden: torch.Tensor, lm_head: nn.Module) -> None:
        self.hidden = hidden
        self._lm_head = lm_head
        self._logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:  # type: ignore[override]
        if self._logits is None:
            self._logits = self._lm_head(self.hidden)
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor) -> None:
        self._logits = value

    def project(self, *index: torch.Tensor) -> torch.Tensor:
        """Logits of ``hidden[index]`` only (e.g. each row's last position), without the full [B, T, V]
        (taken from the full logits if something already built them)."""
        if self._logits is not None:
            return self._logits[index]
        return self._lm_head(self.hidden[index])


def cache_context(
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: KVCache,
    cache_slots: torch.Tensor | None,
    position_ids: torch.Tensor,
    head_dim: int,
    kv_len: int | None = None,
    contiguous_slots: bool = False,
) -> StepContext:
    """The `StepContext` of a forward over `kv_cache`: rows are slots `cache_slots`, tokens at the
    absolute `position_ids` [B, T]; a query at p sees keys 0..p of its slot."""
    if cache_slots is None:
        raise ValueError("forward with kv_cache needs cache_slots [B] (one cache row per batch row)")
    if kv_len is None:
        kv_len = int(position_ids.max()) + 1  # one host sync per forward, to attend over no more keys
    if kv_len > kv_cache.max_len:
        raise ValueError(f"position {kv_len - 1} is beyond the KV cache length {kv_cache.max_len}")
    ctx = StepContext(
        cos=cos, sin=sin, kv_cache=kv_cache, cache_slots=cache_slots.to(torch.long),
        position_ids=position_ids, kv_len=kv_len, contiguous_slots=contiguous_slots,
    )  # fmt: skip
    if position_ids.shape[1] <= decode_attention.MAX_TOKENS and decode_attention.use_for_decode(
        position_ids, head_dim
    ):
        # A few new tokens per row: the decode kernel writes K/V and reads each row's own keys, no mask.
        ctx.decode_kernel = True
    else:
        ctx.mask = torch.arange(kv_len, device=position_ids.device) <= position_ids[:, None, :, None]
    return ctx


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, moe_index: int | None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        if moe_index is None:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        else:
            self.mlp = SparseMoeBlock(
                config.hidden_size, config.num_experts, config.num_experts_per_tok,
                config.moe_intermediate_size, config.norm_topk_prob, moe_index,
            )  # fmt: skip
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, ctx: StepContext, routing: RoutingState | None, recompute_ffn: bool = False
    ) -> torch.Tensor:
        """`recompute_ffn`: keep only the MLP / MoE block's input and recompute it in backward."""
        a = self.self_attn(self.input_layernorm(h), ctx)
        norm = self.post_attention_layernorm
        if norm.fused(h):  # --true-on-policy-mode on the Triton kernels: residual add and norm in one
            h, x = norm.add(h, a)
            if recompute_ffn:
                return h + checkpoint(self._mlp, x, routing, use_reentrant=False)
            return h + self._mlp(x, routing)
        h = h + a
        if recompute_ffn:
            return h + checkpoint(self._ffn, h, routing, use_reentrant=False)
        return h + self._ffn(h, routing)

    def _ffn(self, h: torch.Tensor, routing: RoutingState | None) -> torch.Tensor:
        return self._mlp(self.post_attention_layernorm(h), routing)

    def _mlp(self, x: torch.Tensor, routing: RoutingState | None) -> torch.Tensor:
        return self.mlp(x, routing) if isinstance(self.mlp, SparseMoeBlock) else self.mlp(x)


class TransformerBody(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe_ids = config.moe_layer_ids
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, moe_ids.index(i) if i in moe_ids else None)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        # Activation checkpointing while training (set by the trainer): None, "full" (recompute each
        # decoder layer in backward) or "selective" (recompute only each layer's MLP / MoE block, whose
        # expert activations are the largest; attention activations are kept).
        self.recompute: str | None = None

    def run_layers(self, h: torch.Tensor, ctx: StepContext, routing: RoutingState | None) -> torch.Tensor:
        mode = self.recompute if (self.training and torch.is_grad_enabled()) else None
        for layer in self.layers:
            if mode == "full":
                h = checkpoint(layer, h, ctx, routing, use_reentrant=False)
            elif mode == "selective":  # through the layer's __call__, so its hooks (FSDP's) run
                h = layer(h, ctx, routing, recompute_ffn=True)
            else:
                h = layer(h, ctx, routing)
        return h


class CausalLM(nn.Module):
    """Decoder-only LM for Qwen3-MoE / Qwen3 / Qwen2 / Llama checkpoints."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TransformerBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Kernel of packed (varlen) attention: "auto" or one of layers.PACKED_KERNELS (the trainer sets
        # it from --packed-attention).
        self.packed_attention = "auto"
        self.tie_weights()

    @property
    def num_moe_layers(self) -> int:
        return len(self.config.moe_layer_ids)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_slots: torch.Tensor | None = None,
        routing: RoutingState | None = None,
        return_hidden: bool = False,
        kv_len: int | None = None,
        contiguous_slots: bool = False,
        seq_lens: list[int] | None = None,
        compute_logits: bool = True,
    ) -> ModelOutput:
        """Logits for `input_ids` [B, T].

        Without `kv_cache`: causal attention over the T tokens, positions default to arange(T).
        With `kv_cache`: row b is cache slot `cache_slots[b]`; `position_ids` [B, T] (required) are absolute
        positions. Each token's K/V is written at its position and a query at p sees keys 0..p of its slot.
        Padding queries must use positions past the row's real tokens (and < max_len), e.g. keep counting.

        Speed options (results are unchanged): `kv_len` (> every position) saves the host sync that finds
        it; `contiguous_slots` promises ``cache_slots == arange(B)`` so keys are read as a view (the CUDA
        graph decode path). `seq_lens` packs sequences into one row (B == 1): each is causal on its own and
        `position_ids` restart per sequence. With ``compute_logits=False`` the logits are built from
        ``hidden`` only when read (see `LazyLogitsOutput`), so a caller can project just the rows it needs.
        """
        b, t = input_ids.shape
        if position_ids is None:
            if kv_cache is not None:
                raise ValueError("forward with kv_cache needs position_ids [B, T] (absolute positions)")
            if seq_lens is not None:
                position_ids = torch.cat([torch.arange(n, device=input_ids.device) for n in seq_lens])[None]
            else:
                position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        ctx = StepContext(cos=cos, sin=sin)
        if kv_cache is not None:
            ctx = cache_context(
                cos, sin, kv_cache, cache_slots, position_ids, self.config.head_dim, kv_len, contiguous_slots
            )
        elif seq_lens is not None:
            if b != 1 or sum(seq_lens) != t:
                raise ValueError(
                    f"packed forward needs input [1, sum(seq_lens)], got {tuple(input_ids.shape)}"
                )
            cu = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            ctx.seq_lens, ctx.cu_seqlens = list(seq_lens), to_device(cu, input_ids.device)
            ctx.max_seqlen = max(seq_lens)
            ctx.packed_kernel = packed_attention_kernel(
                input_ids.device, self.config.head_dim, self.packed_attention
            )
        if routing is not None and routing.record:
            routing.clear()
        h = self.model.run_layers(h, ctx, routing)
        h = self.model.norm(h)
        if not compute_logits:
            return LazyLogitsOutput(h, self.lm_head)
        return ModelOutput(logits=self.lm_head(h), hidden=h if return_hidden else None)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init: normal(0, initializer_range) for matrices, zero biases, unit norms."""
        std = self.config.initializer_range or 0.02
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0.0, std)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0.0, std)
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, Experts):
                mod.gate_up_proj.normal_(0.0, std)
                mod.down_proj.normal_(0.0, std)


# architectures[0] -> model class. Plugins may add entries (e.g. a draft-head model).
MODEL_CLASSES: dict[str, type[CausalLM]] = {
    name: CausalLM
    for name in ("Qwen3MoeForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
}


def build_model(
    config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
    init: bool = True,
) -> CausalLM:  # fmt: skip
    """A `CausalLM` for `config` with random weights (or uninitialised memory with init=False, for loading).

    The module is built on the meta device and materialised once on `device`, so nothing is initialised
    twice and a large model never passes through CPU memory.
    """
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise UsageError(
            f"no model class is registered for architecture {config.architecture!r}; use one of "
            f"{sorted(MODEL_CLASSES)}."
        )
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty materialises shared parameters separately; share them again
    if init:
        model.init_weights()
    return model


def swap_modules(model: nn.Module, fn: Callable[[str, nn.Module], nn.Module | None]) -> list[str]:
    """Replace each submodule for which `fn(name, module)` returns a new module; returns replaced names.

    Children of a replaced module are not visited (they belong to the old module).
    """
    replaced: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or any(name.startswith(r + ".") for r in replaced):
            continue
        new = fn(name, mod)
        if new is None or new is mod:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        replaced.append(name)
    return replaced
