"""Shared pieces of the miles-int4qat tests: a tiny random Qwen3-MoE, a plugin manager with only this
plugin, and a saved checkpoint with a small BPE tokenizer for end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import miles_int4qat.plugin as int4_plugin
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from miles_core.model import CausalLM, ModelConfig, build_model, save_model
from miles_core.plugins import get_plugin_manager

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


def _tokenizer(out: Path) -> int:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([f"{a}+{b}={a + b}" for a in range(20) for b in range(20)], trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok.get_vocab_size()


def checkpoint(tmp_path: Path) -> Path:
    """A saved tiny Qwen3-MoE (hidden 32, expert FFN 32) with its tokenizer."""
    vocab = _tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = build_model(moe_config(vocab=vocab, eos_token_id=1))
    return save_model(model, tmp_path / "ckpt", tokenizer_src=tmp_path / "tok")
