"""`ModelConfig`: the built-in transformer's view of an HF `config.json`.

`from_hf` reads the handful of fields the model needs (accepting both the transformers 4.x and 5.x spellings,
e.g. `rope_theta`/`rope_scaling` vs `rope_parameters`, `num_experts` vs `num_local_experts`) and keeps the
original dict, so `to_hf` writes back exactly what it read, unknown keys included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from miles_core.types import UsageError


@dataclass(frozen=True)
class ArchTraits:
    """What distinguishes one supported HF architecture from another in this model."""

    model_type: str
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    qkv_bias: bool = False  # bias on q/k/v but not o (Qwen2)
    moe: bool = False


# Keyed by `architectures[0]` of config.json. Adding an architecture that fits this decoder is one entry.
ARCH_TRAITS: dict[str, ArchTraits] = {
    "Qwen3MoeForCausalLM": ArchTraits("qwen3_moe", qk_norm=True, moe=True),
    "Qwen3ForCausalLM": ArchTraits("qwen3", qk_norm=True),
    "Qwen2ForCausalLM": ArchTraits("qwen2", qkv_bias=True),
    "LlamaForCausalLM": ArchTraits("llama"),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Decoder-only transformer hyper-parameters; field names follow HF's."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope parameters beyond theta ("rope_type", "factor", ...)
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v/o (Llama, Qwen3)
    mlp_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    is_moe: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # the config.json this came from

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the decoder layers whose MLP is a mixture of experts (Qwen3-MoE's rule)."""
        if not self.is_moe or self.num_experts <= 0:
            return []
        skip = set(self.mlp_only_layers)
        step = max(1, self.decoder_sparse_step)
        return [i for i in range(self.num_hidden_layers) if i not in skip and (i + 1) % step == 0]

    @property
    def rope_type(self) -> str:
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF `config.json`; unsupported architectures or RoPE types raise UsageError."""
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in ARCH_TRAITS:
            raise UsageError(
                f"model architecture {arch!r} is not supported by the built-in model; use a checkpoint of "
                f"one of {sorted(ARCH_TRAITS)}."
            )
        traits = ARCH_TRAITS[arch]
        try:
            hidden, n_heads = d["hidden_size"], d["num_attention_heads"]
            kw: dict[str, Any] = dict(
                vocab_size=d["vocab_size"],
                hidden_size=hidden,
                intermediate_size=d.get("intermediate_size", 0),
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=n_heads,
            )
        except KeyError as e:
            raise UsageError(
                f"config.json lacks the required key {e.args[0]!r}; add it to the config."
            ) from e
        kw["num_key_value_heads"] = d.get("num_key_value_heads") or n_heads
        kw["head_dim"] = d.get("head_dim") or hidden // n_heads
        theta, scaling = _rope_from_hf(d)
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UsageError(
                    f"rope scaling type {rope_type!r} is not supported by the built-in model; use one of "
                    f"{list(SUPPORTED_ROPE_TYPES)}."
                )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UsageError(f"hidden_act {act!r} is not supported by the built-in model; only 'silu' is.")
        if d.get("use_sliding_window"):
            raise UsageError("sliding-window attention is not supported by the built-in model; set it off.")
        num_experts = d.get("num_experts", d.get("num_local_experts", 0)) or 0
        return cls(
            architecture=arch,
            **kw,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            hidden_act=act,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qkv_bias=traits.qkv_bias,
            qk_norm=traits.qk_norm,
            is_moe=traits.moe and num_experts > 0,
            num_experts=num_experts,
            num_experts_per_tok=d.get("num_experts_per_tok", 0) or 0,
            moe_intermediate_size=d.get("moe_intermediate_size", 0) or 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=list(d.get("mlp_only_layers") or []),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=copy.deepcopy(d),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config dict: the original one with this object's (possibly edited) fields written back."""
        d = copy.deepcopy(self.raw)
        d["architectures"] = [self.architecture] + list(d.get("architectures", [])[1:])
        d.setdefault("model_type", ARCH_TRAITS[self.architecture].model_type)
        plain = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "hidden_act",
            "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
        ]  # fmt: skip
        for key in plain:
            d[key] = getattr(self, key)
        # Optional keys: written back where the source had them, or where leaving them out changes meaning.
        if "head_dim" in d or self.head_dim != self.hidden_size // self.num_attention_heads:
            d["head_dim"] = self.head_dim
        for key in ("attention_bias", "mlp_bias"):
            if key in d or getattr(self, key):
                d[key] = getattr(self, key)
        if self.is_moe or "num_experts_per_tok" in d:
            expert_key = "num_local_experts" if "num_local_experts" in d else "num_experts"
            d[expert_key] = self.num_experts
            for key in ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
                d[key] = getattr(self, key)
            d["decoder_sparse_step"] = self.decoder_sparse_step
            d["mlp_only_layers"] = list(self.mlp_only_layers)
        _rope_to_hf(d, self.rope_theta, self.rope_scaling)
        return d


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
        return float(theta), scaling
    scaling = d.get("rope_scaling")
    return float(d.get("rope_theta", 10000.0)), (dict(scaling) if scaling else None)


def _rope_to_hf(d: dict[str, Any], theta: float, scaling: dict[str, Any] | None) -> None:
    if isinstance(d.get("rope_parameters"), dict):
        d["rope_parameters"] = {"rope_theta": theta, **(scaling or {"rope_type": "default"})}
        return
    d["rope_theta"] = theta
    if scaling is not None or "rope_scaling" in d:
        d["rope_scaling"] = scaling
