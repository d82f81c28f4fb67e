"""Shared fixtures: a tiny random Qwen3-MoE checkpoint (with the demo's tokenizer) and its data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from miles_core.model import ModelConfig, build_model, save_model

REPO = Path(__file__).resolve().parent.parent
DEMO_CKPT = REPO / "examples" / "arith" / "checkpoint"
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(vocab_size: int, eos: int, **over) -> dict:
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "initializer_range": 0.1,
        "eos_token_id": eos,
    }
    cfg.update(over)
    return cfg


def make_checkpoint(out: Path, seed: int = 0, **over) -> Path:
    """A random tiny MoE saved by miles, with the demo tokenizer files beside it."""
    tok = json.loads((DEMO_CKPT / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_hf(tiny_config(vocab, eos, **over)))
    save_model(model, out, tokenizer_src=str(DEMO_CKPT))
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {a}+{b}?", "label": str(a + b)} for a in range(10, 20) for b in range(20, 24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "reward.py"
    path.write_text("async def reward(args, sample):\n    return float(len(sample.response) % 2)\n")
    return path
