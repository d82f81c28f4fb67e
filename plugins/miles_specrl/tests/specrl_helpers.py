"""Shared pieces of the miles-specrl tests: tiny random models with MTP heads, engines with a speculator,
checkpoints with MTP layers on disk, and parsed flags with the plugin registered.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import miles_specrl.plugin as specrl_plugin
import torch
from miles_specrl.drafters import ModelDrafter, MTPDrafter
from miles_specrl.mtp import add_mtp_layers, attach_mtp
from miles_specrl.speculator import Speculator

from miles_core import RolloutOptions
from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.model import CausalLM, ModelConfig, build_model, save_model
from miles_core.plugins import configure_plugins, get_plugin_manager


def tiny_model(
    seed: int = 0, vocab: int = 48, layers: int = 2, hidden: int = 32, moe: bool = False, std: float = 0.2
) -> CausalLM:
    """A random fp32 Qwen3 (or Qwen3-MoE) without EOS, so every sample runs to max_new_tokens."""
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": hidden // 4, "initializer_range": std, "eos_token_id": None,
        "tie_word_embeddings": True,
    }  # fmt: skip
    if moe:
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, norm_topk_prob=True)
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_hf(cfg), dtype=torch.float32).eval()


def with_mtp(model: CausalLM, num_layers: int = 1, seed: int = 1, std: float = 0.2) -> CausalLM:
    heads = attach_mtp(model, num_layers)
    heads.config = copy.copy(heads.config)
    heads.config.initializer_range = std
    heads.init_weights(seed)
    return model


def engine(model: CausalLM, n: int, seed: int = 0, spec: Speculator | None = None) -> Engine:
    eng = Engine(model, max_batch_size=n, seed=seed)
    if spec is not None:
        use(spec, eng)
    return eng


def use(spec: Speculator, eng: Engine) -> None:
    """What a rollout with the plugin does: prepare the speculator, hand it to the engine."""
    spec.prepare(eng)
    eng.set_rollout_options(RolloutOptions(decode_strategy=spec))


def mtp_speculator(k: int = 3, verifier: str = "rejection") -> Speculator:
    return Speculator(MTPDrafter(), k, verifier=verifier)


def model_speculator(draft: CausalLM, k: int = 3) -> Speculator:
    return Speculator(ModelDrafter(draft), k)


def checkpoint_with_mtp(tmp: Path, model: CausalLM, num_layers: int = 1) -> Path:
    """``model`` saved as an HF checkpoint, then converted to carry ``num_layers`` MTP depths."""
    plain = save_model(model, tmp / "plain")
    return add_mtp_layers(plain, tmp / "mtp", num_layers, seed=3)


def plugin_manager():
    """Core built-ins plus miles-specrl (no other installed plugin is loaded)."""
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[specrl_plugin])


def make_args(pm, *flags: str, num_samples: int = 4) -> argparse.Namespace:
    args = parse_args(["--lr", "1e-3", "--n-samples-per-prompt", "2", "--micro-batch-size", "2", *flags], pm)
    args.rollout_batch_size = num_samples // 2
    args.num_rollout, args.global_batch_size, args.num_steps_per_rollout = 1, num_samples, 1
    configure_plugins(pm, args)
    return args
