"""Shared pieces of the miles-int4qat tests: a tiny random Qwen3-MoE, a plugin manager with only this
plugin, and a saved checkpoint with a small BPE tokenizer for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import miles_int4qat.plugin as int4_plugin
import torch

from miles_core.model import CausalLM, ModelConfig, build_model, save_model
from miles_core.plugins import get_plugin_manager
from miles_core.testing import write_sum_tokenizer

VOCAB = 64


def plugin_manager(with_int4: bool = True):
    """Core built-ins only (installed plugins are not loaded), plus miles-int4qat when asked."""
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[int4_plugin] if with_int4 else [])


def moe_config(
    vocab: int = VOCAB, hidden: int = 32, inter: int = 32, layers: int = 2, **extra
) -> ModelConfig:
    return ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": hidden // 4, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": inter, "norm_topk_prob": True, "initializer_range": 0.2,
            "max_position_embeddings": 128, **extra,
        }
    )  # fmt: skip


def tiny_moe(seed: int = 0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return build_model(moe_config(**kw), dtype=torch.float32).eval()


def checkpoint(tmp_path: Path) -> Path:
    """A saved tiny Qwen3-MoE (hidden 32, expert FFN 32) with its tokenizer."""
    vocab = write_sum_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model(moe_config(vocab=vocab, eos_token_id=1))
    return save_model(model, tmp_path / "ckpt", tokenizer_src=tmp_path / "tok")
