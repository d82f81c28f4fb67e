"""Shared pieces of the miles-r3 tests: a plugin manager with (or without) R3, parsed flags, a tiny random
Qwen3-MoE whose router logits sit close together, and a bf16 rollout of it through the built-in engine.
"""

from __future__ import annotations

import argparse
import copy
import random

import miles_r3.plugin as r3_plugin
import torch

from miles_core import Sample, Status
from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.loop import make_train_batch
from miles_core.model import CausalLM, ModelConfig, build_model
from miles_core.plugins import configure_plugins, get_plugin_manager
from miles_core.rollout.manager import rollout_options
from miles_core.types import TrainBatch

VOCAB = 64
N_SAMPLES = 2  # per prompt


def plugin_manager(with_r3: bool = True):
    """Core built-ins only (no installed plugin is loaded), plus R3 when asked."""
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[r3_plugin] if with_r3 else [])


def make_args(pm, *flags: str, num_samples: int = 8) -> argparse.Namespace:
    """Parse ``flags`` with the run-shape flags a trainer needs, then run every plugin's ``configure``."""
    args = parse_args(
        ["--lr", "1e-3", "--n-samples-per-prompt", str(N_SAMPLES), "--micro-batch-size", "3", *flags], pm
    )
    args.rollout_batch_size = num_samples // N_SAMPLES
    args.num_rollout, args.global_batch_size, args.num_steps_per_rollout = 1, num_samples, 1
    configure_plugins(pm, args)
    return args


def tiny_moe(seed: int = 0, layers: int = 2, experts: int = 8, topk: int = 2, hidden: int = 32) -> CausalLM:
    """A random Qwen3-MoE in fp32 whose router logits are close together, so precision flips routes."""
    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"],
            "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": hidden // 4, "num_experts": experts, "num_experts_per_tok": topk,
            "moe_intermediate_size": hidden, "norm_topk_prob": True, "initializer_range": 0.2,
        }
    )  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(0.1)  # near-tied router logits: bf16 noise is enough to reorder them
    return model.eval()


def rollout(model: CausalLM, pm, args: argparse.Namespace, num_samples: int = 8, new_tokens: int = 8,
            seed: int = 0) -> list[Sample]:  # fmt: skip
    """Generate with a bf16 copy of ``model`` (route capture through the plugin), rewards random."""
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), max_batch_size=num_samples, seed=seed)
    engine.set_rollout_options(rollout_options(pm, args, 0, engine))
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(VOCAB) for _ in range(rng.randint(3, 6))] for _ in range(num_samples // N_SAMPLES)
    ]
    prompts = [p for p in prompts for _ in range(N_SAMPLES)]
    outs = engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": new_tokens})
    samples = []
    for i, (p, out) in enumerate(zip(prompts, outs)):
        s = Sample(group_index=i // N_SAMPLES, index=i, tokens=p + out.output_ids)
        s.response_length = len(out.output_ids)
        s.rollout_log_probs, s.loss_mask = out.log_probs, [1] * len(out.output_ids)
        s.status, s.reward = Status.TRUNCATED, rng.random()
        if out.routed_experts is not None:
            pm.hook.on_route_record(args=args, sample=s, routed_experts=out.routed_experts)
        samples.append(s)
    return samples


def batch_of(samples: list[Sample], args: argparse.Namespace) -> TrainBatch:
    return make_train_batch(samples, args)
