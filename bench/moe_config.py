"""Random Qwen3-MoE models for the benchmarks: one builder and the rollout presets they share.

`ROLLOUT_PRESETS["gpu"]` is the speed issue's ~0.7B config (vocab 32000, hidden 1024, 12 layers,
16/4 heads, head_dim 64, 32 experts top-4, expert FFN 512, dense FFN 2816); ``qwen3-30b-a3b`` has the
shape of Qwen3-30B-A3B's layers (vocab 151936, hidden 2048, 32/4 heads of 128, 128 experts top-8, expert
FFN 768) with 8 of its 48 layers by default (``--layers``: a bf16 copy and a quantized copy of 8 layers
take ~15 GB of one card).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import torch

from miles_core import Sample, Status
from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.model import CausalLM, ModelConfig, build_model, fused_moe, set_fused_moe
from miles_core.plugins import configure_plugins

ROLLOUT_PRESETS = {
    "gpu": dict(vocab=32000, hidden=1024, layers=12, heads=16, kv=4, head_dim=64, experts=32, topk=4,
                inter=512, dense=2816, batch=64, prompt=128, new=256),
    "qwen3-30b-a3b": dict(vocab=151936, hidden=2048, layers=8, heads=32, kv=4, head_dim=128, experts=128,
                          topk=8, inter=768, dense=6144, batch=64, prompt=128, new=256),
    "cpu-small": dict(vocab=512, hidden=128, layers=2, heads=4, kv=2, head_dim=32, experts=8, topk=2,
                      inter=128, dense=256, batch=8, prompt=16, new=16),
}  # fmt: skip


def rollout_engine(model: CausalLM, batch: int, *, eager: bool = False, compile: bool = False) -> Engine:
    """An engine set up as `Engine.from_args` sets it up for a rollout of ``batch`` rows: bf16 experts on
    the Triton decode kernels where they run (--rollout-fused-moe's default), CUDA graphs on CUDA unless
    ``eager`` (or a module declares itself graph-unsafe), the decode step compiled with ``compile``."""
    cfg = model.config
    if fused_moe.available(model.lm_head.weight):
        set_fused_moe(model, fused_moe.default_max_rows(cfg.num_experts, cfg.num_experts_per_tok, batch))
    on_cuda = model.lm_head.weight.is_cuda
    return Engine(
        model, max_batch_size=batch, seed=0, cuda_graph=on_cuda and not eager, compile=compile and not eager
    )


def random_moe(
    p: dict,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_positions: int = 4096,
) -> CausalLM:
    """A seeded random Qwen3-MoE in eval mode from a preset dict.

    Keys: vocab, hidden, layers, experts, topk; optional heads (4), kv (2), head_dim (hidden // heads),
    inter (expert FFN, default hidden), dense (dense FFN, default 2 * hidden), init (initializer_range).
    """
    heads = p.get("heads", 4)
    hf = {
        "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": p["vocab"], "hidden_size": p["hidden"],
        "intermediate_size": p.get("dense", 2 * p["hidden"]), "num_hidden_layers": p["layers"],
        "num_attention_heads": heads, "num_key_value_heads": p.get("kv", 2),
        "head_dim": p.get("head_dim", p["hidden"] // heads), "num_experts": p["experts"],
        "num_experts_per_tok": p["topk"], "moe_intermediate_size": p.get("inter", p["hidden"]),
        "norm_topk_prob": True, "max_position_embeddings": max_positions,
    }  # fmt: skip
    if "init" in p:
        hf["initializer_range"] = p["init"]
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_hf(hf), dtype=dtype, device=device).eval()


def group_args(pm, p: dict, *flags: str) -> argparse.Namespace:
    """Parsed flags for one rollout of ``p["prompts"]`` groups of ``p["n"]`` trained in one step, after
    every plugin's ``configure``."""
    args = parse_args(["--n-samples-per-prompt", str(p["n"]), "--micro-batch-size", "16", *flags], pm)
    args.rollout_batch_size, args.num_rollout = p["prompts"], 1
    args.global_batch_size, args.num_steps_per_rollout = p["prompts"] * p["n"], 1
    configure_plugins(pm, args)
    return args


def random_group_samples(
    engine, p: dict, seed: int, *, random_rewards: bool, each: Callable[[Sample, object], None] | None = None
) -> list[Sample]:
    """``p["prompts"]`` random prompts (8-16 tokens below ``p["vocab"]``), each sampled ``p["n"]`` times
    at temperature 1 for ``p["new_tokens"]`` tokens, as truncated samples; rewards are uniform random or
    0. ``each(sample, engine_output)`` runs on every sample (route recording, say)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(p["vocab"]) for _ in range(rng.randint(8, 16))] for _ in range(p["prompts"])]
    prompts = [q for q in prompts for _ in range(p["n"])]
    outs = engine.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": p["new_tokens"]})
    samples = []
    for i, (q, out) in enumerate(zip(prompts, outs)):
        reward = rng.random() if random_rewards else 0.0
        s = Sample(group_index=i // p["n"], index=i, tokens=q + out.output_ids, reward=reward)
        s.response_length, s.status = len(out.output_ids), Status.TRUNCATED
        s.rollout_log_probs, s.loss_mask = out.log_probs, [1] * len(out.output_ids)
        if each is not None:
            each(s, out)
        samples.append(s)
    return samples
