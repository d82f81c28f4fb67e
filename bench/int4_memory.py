"""Benchmark: bytes the rollout engine holds for the INT4 scope, packed INT4 vs BF16 (CPU).

Builds a random Qwen3-MoE engine model in bf16, measures the bytes of the scope's tensors it actually
holds, swaps them for packed INT4 modules through the miles-int4qat plugin (configure_model,
role="rollout") and measures again, together with every tensor of the whole model.

    python bench/int4_memory.py [--group-size 128] [--scope experts|all-linear]

Prints one JSON line with bf16_bytes, int4_bytes, their ratio and ok (int4_bytes <= bf16_bytes / 3.5).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "plugins" / "miles_int4qat"):  # runnable from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import miles_int4qat.plugin as int4_plugin  # noqa: E402
from miles_int4qat.modules import Int4Experts, Int4Linear, scope_modules  # noqa: E402

from miles_core.args import parse_args  # noqa: E402
from miles_core.model import ModelConfig, build_model  # noqa: E402
from miles_core.plugins import configure_plugins, get_plugin_manager  # noqa: E402


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the module holds (parameters and buffers)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--scope", choices=("experts", "all-linear"), default="experts")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 1024, "hidden_size": ns.hidden,
            "intermediate_size": 2 * ns.hidden, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": ns.hidden // 4, "num_experts": ns.experts,
            "num_experts_per_tok": 4, "moe_intermediate_size": ns.hidden, "norm_topk_prob": True,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config, dtype=torch.bfloat16).requires_grad_(False)
    bf16_bytes = sum(held_bytes(m) for m in scope_modules(model, ns.scope).values())
    total_before = held_bytes(model)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[int4_plugin])
    flags = ["--int4-rollout", "--int4-group-size", str(ns.group_size), "--int4-scope", ns.scope]
    args = parse_args(flags, pm)
    configure_plugins(pm, args)
    pm.hook.configure_model(args=args, model=model, role="rollout")
    gc.collect()
    int4_bytes = sum(held_bytes(m) for m in model.modules() if isinstance(m, (Int4Experts, Int4Linear)))
    result = {
        "bench": "int4_memory",
        "device": "cpu",
        "scope": ns.scope,
        "group_size": ns.group_size,
        "bf16_bytes": bf16_bytes,
        "int4_bytes": int4_bytes,
        "ratio": round(bf16_bytes / int4_bytes, 3),
        "model_bytes_before": total_before,
        "model_bytes_after": held_bytes(model),
        "full_precision_left_in_scope": any(
            p.is_floating_point() and p.numel() > 0
            for n, p in model.named_parameters()
            if ".experts." in n or (ns.scope == "all-linear" and "_proj" in n)
        ),
    }
    result["ok"] = bool(int4_bytes * 3.5 <= bf16_bytes and not result["full_precision_left_in_scope"])
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
