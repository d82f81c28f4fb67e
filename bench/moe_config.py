"""Random Qwen3-MoE models for the benchmarks: one builder and the rollout presets they share.

`ROLLOUT_PRESETS["gpu"]` is the speed issue's ~0.7B config (vocab 32000, hidden 1024, 12 layers,
16/4 heads, head_dim 64, 32 experts top-4, expert FFN 512, dense FFN 2816).
"""

from __future__ import annotations

import torch

from miles_core.model import CausalLM, ModelConfig, build_model

ROLLOUT_PRESETS = {
    "gpu": dict(vocab=32000, hidden=1024, layers=12, heads=16, kv=4, head_dim=64, experts=32, topk=4,
                inter=512, dense=2816, batch=64, prompt=128, new=256),
    "cpu-small": dict(vocab=512, hidden=128, layers=2, heads=4, kv=2, head_dim=32, experts=8, topk=2,
                      inter=128, dense=256, batch=8, prompt=16, new=16),
}  # fmt: skip


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
