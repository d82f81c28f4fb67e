"""Shared pieces of the miles-fp8 tests: a plugin manager with the fp8 plugin, parsed flags, a tiny MoE."""

from __future__ import annotations

import argparse

import miles_fp8.plugin as fp8_plugin
import torch

from miles_core.args import parse_args
from miles_core.model import CausalLM, ModelConfig, build_model
from miles_core.plugins import configure_plugins, get_plugin_manager

VOCAB = 64


def plugin_manager():
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[fp8_plugin])


def make_args(pm, *flags: str, num_samples: int = 8, n: int = 2) -> argparse.Namespace:
    args = parse_args(
        ["--lr", "1e-3", "--n-samples-per-prompt", str(n), "--micro-batch-size", "4", *flags], pm
    )
    args.rollout_batch_size = num_samples // n
    args.num_rollout, args.global_batch_size, args.num_steps_per_rollout = 1, num_samples, 1
    configure_plugins(pm, args)
    return args


def tiny_moe(seed: int = 0, hidden: int = 96, layers: int = 2, experts: int = 4) -> CausalLM:
    """A random fp32 Qwen3-MoE; hidden 96 is not a multiple of 128, so every block is a partial one."""
    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": VOCAB, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": hidden // 4, "num_experts": experts,
            "num_experts_per_tok": 2, "moe_intermediate_size": hidden, "norm_topk_prob": True,
            "initializer_range": 0.05, "eos_token_id": 1,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    return build_model(config, dtype=torch.float32).eval()
