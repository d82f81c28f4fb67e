"""End to end: `miles train --use-rollout-routing-replay` on a tiny saved Qwen3-MoE checkpoint (bf16
rollout, fp32 training) runs two rollouts and logs routing_mismatch_frac and the routes' memory; with
--true-on-policy-mode, replay and the mode together log zero routing and log-prob mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import miles_r3.plugin as r3_plugin
import pytest
import torch

import miles_core.plugins
from miles_core import cli
from miles_core.model import ModelConfig, build_model, save_model
from miles_core.plugins import get_plugin_manager
from miles_core.testing import write_sum_tokenizer

REWARD = """
async def reward(args, sample):
    return float(len(sample.response) % 2)
"""


def _checkpoint(tmp_path: Path) -> Path:
    vocab = write_sum_tokenizer(tmp_path / "tok")
    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": vocab, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 8, "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "norm_topk_prob": True, "initializer_range": 0.2,
            "eos_token_id": 1, "max_position_embeddings": 128,
        }
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(0.1)  # near-tied router logits, so bf16 rollout routes differ
    return save_model(model, tmp_path / "ckpt", tokenizer_src=tmp_path / "tok")


def _megatron_installed() -> bool:
    import importlib.util

    from miles_core import drivers

    has_core = importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core")
    return bool(has_core) and "megatron" in drivers.available(drivers.TRAIN_BACKENDS)


def _train(tmp_path: Path, monkeypatch, *flags: str, device: str = "cpu") -> list[dict]:
    """Two rollouts of `miles train` on `_checkpoint` with only the core and R3; the metric rows."""
    ckpt = _checkpoint(tmp_path)
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"input": f"{a}+{a + 1}=", "label": str(2 * a + 1)}) + "\n" for a in range(4))
    )
    (tmp_path / "rm.py").write_text(REWARD)
    run_dir = tmp_path / "run"

    def only_core_and_r3(**kw):
        kw["env"] = {"MILES_LOAD_PLUGINS": ""}
        return get_plugin_manager(**kw, extra=[r3_plugin])

    monkeypatch.setattr(miles_core.plugins, "get_plugin_manager", only_core_and_r3)
    rc = cli.main(
        [
            "train", "--hf-checkpoint", str(ckpt), "--prompt-data", str(data), "--label-key", "label",
            "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-rollout", "2",
            "--rollout-max-response-len", "6", "--custom-rm-path", str(tmp_path / "rm.py"),
            "--run-dir", str(run_dir), "--device", device, "--micro-batch-size", "2", "--lr", "1e-3",
            "--use-rollout-routing-replay", *flags,
        ]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "train/routing_mismatch_frac" in r]
    assert len(trained) == 2
    return trained


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("megatron", marks=pytest.mark.skipif(
        not _megatron_installed(), reason="needs miles-core[megatron] installed (its train backend)"))],
)  # fmt: skip
def test_miles_train_with_rollout_routing_replay_logs_mismatch(tmp_path, monkeypatch, backend):
    # megatron-core puts its model on the GPU wherever CUDA exists, so there the run trains on CUDA
    device = "cuda" if backend == "megatron" and torch.cuda.is_available() else "cpu"
    flags = ("--rollout-dtype", "bfloat16", "--train-backend", backend)
    for row in _train(tmp_path, monkeypatch, *flags, device=device):
        assert 0 <= row["train/routing_mismatch_frac"] <= 1
        assert row["rollout/routes_bytes"] > 0
        assert row["rollout/routes_bytes_per_token"] == 2 * 2 * 4  # L * k * int32


def test_replay_in_true_on_policy_mode_routes_and_scores_alike(tmp_path, monkeypatch):
    for row in _train(tmp_path, monkeypatch, "--true-on-policy-mode"):
        assert row["train/routing_mismatch_frac"] == 0.0
        assert row["train/train_rollout_logprob_abs_diff"] == 0.0 and row["train/train_rollout_kl"] == 0.0
