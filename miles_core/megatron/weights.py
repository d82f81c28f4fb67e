"""HF tensors <-> megatron-core `GPTModel` state (local spec), sharded by tensor and expert parallelism.

Megatron fuses what HF keeps apart: q/k/v into ``linear_qkv`` (grouped per KV head: the group's query
heads, then its key head, then its value head), gate/up into ``linear_fc1`` ([gate; up]). Tensor
parallelism splits column-parallel weights (qkv by whole KV groups, fc1 as [gate_r; up_r], the vocab of
the embedding and output layer) on dim 0 and row-parallel ones (``linear_proj``, ``linear_fc2``) on
dim 1; norms and the router are replicated. Expert parallelism gives rank r the experts
``[r*E/ep, (r+1)*E/ep)`` as ``local_experts.0..E/ep-1``, each whole (expert tensor parallel size 1).
Both directions only slice and concatenate, so a round trip is bitwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from miles_core.model.config import ModelConfig
from miles_core.types import UsageError

Shards = list[list[dict[str, torch.Tensor]]]  # [tp_rank][ep_rank] -> that rank's Megatron state


def check_sizes(cfg: ModelConfig, tp: int, ep: int) -> None:
    """Refuse TP/EP sizes the model's shapes cannot be split by, naming the flag."""
    parts = {
        "attention heads": cfg.num_attention_heads,
        "key-value heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size if cfg.intermediate_size else tp,
    }
    for what, n in parts.items():
        if n % tp:
            raise UsageError(
                f"--tensor-model-parallel-size {tp} must divide the model's {what} ({n}); pick a divisor."
            )
    if ep > 1 and (not cfg.is_moe or cfg.num_experts % ep):
        raise UsageError(
            f"--expert-model-parallel-size {ep} must divide the model's number of experts "
            f"({cfg.num_experts}); pick a divisor (1 for a dense model)."
        )


def _qkv(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    g, d = cfg.num_key_value_heads, cfg.head_dim
    tail = q.shape[1:]
    q = q.reshape(g, -1, *tail)
    return torch.cat([q, k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1).reshape(-1, *tail)


def _unqkv(cfg: ModelConfig, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = cfg.num_key_value_heads, cfg.head_dim
    per = cfg.num_attention_heads // g * d
    tail = fused.shape[1:]
    q, k, v = fused.reshape(g, per + 2 * d, *tail).split([per, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _fc1(gate: torch.Tensor, up: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return [torch.cat(pair) for pair in zip(gate.chunk(tp), up.chunk(tp))]


def _unfc1(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    halves = [p.chunk(2) for p in parts]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


def hf_to_megatron(cfg: ModelConfig, hf: Mapping[str, torch.Tensor], tp: int = 1, ep: int = 1) -> Shards:
    """Split HF-named tensors into each (tp_rank, ep_rank)'s Megatron state dict (the tensors are views
    or new concatenations; clone them to own them)."""
    check_sizes(cfg, tp, ep)
    shards: Shards = [[{} for _ in range(ep)] for _ in range(tp)]

    def put(name: str, parts: list[torch.Tensor] | torch.Tensor) -> None:
        for r in range(tp):
            piece = parts[r] if isinstance(parts, list) else parts
            for e in range(ep):
                shards[r][e][name] = piece

    put("embedding.word_embeddings.weight", list(hf["model.embed_tokens.weight"].chunk(tp)))
    put("decoder.final_layernorm.weight", hf["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output_layer.weight", list(hf["lm_head.weight"].chunk(tp)))
    moe = set(cfg.moe_layer_ids)
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        put(m + "input_layernorm.weight", hf[h + "input_layernorm.weight"])
        put(m + "pre_mlp_layernorm.weight", hf[h + "post_attention_layernorm.weight"])
        a = h + "self_attn."
        suffixes = ["weight"] + (["bias"] if cfg.qkv_bias else [])
        for s in suffixes:
            fused = _qkv(cfg, hf[a + f"q_proj.{s}"], hf[a + f"k_proj.{s}"], hf[a + f"v_proj.{s}"])
            put(m + f"self_attention.linear_qkv.{s}", list(fused.chunk(tp)))
        put(m + "self_attention.linear_proj.weight", list(hf[a + "o_proj.weight"].chunk(tp, dim=1)))
        if cfg.qk_norm:
            put(m + "self_attention.q_layernorm.weight", hf[a + "q_norm.weight"])
            put(m + "self_attention.k_layernorm.weight", hf[a + "k_norm.weight"])
        if i not in moe:
            p = h + "mlp."
            put(m + "mlp.linear_fc1.weight", _fc1(hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"], tp))
            put(m + "mlp.linear_fc2.weight", list(hf[p + "down_proj.weight"].chunk(tp, dim=1)))
            continue
        put(m + "mlp.router.weight", hf[h + "mlp.gate.weight"])
        local = cfg.num_experts // ep
        for x in range(cfg.num_experts):
            e, j = divmod(x, local)
            p, q = f"{h}mlp.experts.{x}.", f"{m}mlp.experts.local_experts.{j}."
            fc1 = torch.cat([hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"]])
            for r in range(tp):
                shards[r][e][q + "linear_fc1.weight"] = fc1
                shards[r][e][q + "linear_fc2.weight"] = hf[p + "down_proj.weight"]
    return shards


_LOCAL_EXPERT = re.compile(
    r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$"
)


def megatron_to_hf(cfg: ModelConfig, shards: Shards) -> dict[str, torch.Tensor]:
    """Gather each rank's Megatron state (``shards[tp_rank][ep_rank]``) back into HF-named tensors."""
    tp, ep = len(shards), len(shards[0])
    check_sizes(cfg, tp, ep)
    first = shards[0][0]

    def cat(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([shards[r][0][name] for r in range(tp)], dim=dim)

    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight")}
    hf["model.norm.weight"] = first["decoder.final_layernorm.weight"]
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = cat("output_layer.weight")
    moe = set(cfg.moe_layer_ids)
    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        hf[h + "input_layernorm.weight"] = first[m + "input_layernorm.weight"]
        hf[h + "post_attention_layernorm.weight"] = first[m + "pre_mlp_layernorm.weight"]
        a = h + "self_attn."
        for s in ["weight"] + (["bias"] if cfg.qkv_bias else []):
            q, k, v = _unqkv(cfg, cat(m + f"self_attention.linear_qkv.{s}"))
            hf[a + f"q_proj.{s}"], hf[a + f"k_proj.{s}"], hf[a + f"v_proj.{s}"] = q, k, v
        hf[a + "o_proj.weight"] = cat(m + "self_attention.linear_proj.weight", dim=1)
        if cfg.qk_norm:
            hf[a + "q_norm.weight"] = first[m + "self_attention.q_layernorm.weight"]
            hf[a + "k_norm.weight"] = first[m + "self_attention.k_layernorm.weight"]
        if i not in moe:
            p = h + "mlp."
            gate, up = _unfc1([shards[r][0][m + "mlp.linear_fc1.weight"] for r in range(tp)])
            hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"] = gate, up
            hf[p + "down_proj.weight"] = cat(m + "mlp.linear_fc2.weight", dim=1)
            continue
        hf[h + "mlp.gate.weight"] = first[m + "mlp.router.weight"]
    local = cfg.num_experts // ep if cfg.is_moe else 0
    for e in range(ep):
        for name, t in shards[0][e].items():
            found = _LOCAL_EXPERT.match(name)
            if found is None:
                continue
            layer, j, kind = int(found[1]), int(found[2]), found[3]
            p = f"model.layers.{layer}.mlp.experts.{e * local + j}."
            if kind == "linear_fc2":
                hf[p + "down_proj.weight"] = t
            else:
                hf[p + "gate_proj.weight"], hf[p + "up_proj.weight"] = t.chunk(2)
    return hf
