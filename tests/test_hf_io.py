"""HF checkpoint I/O of the built-in model: logits parity with transformers in both directions, sharded
saves, fused expert names, in-place weight loading and the UsageErrors for broken checkpoint folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from miles_core.model import (
    ModelConfig,
    build_model,
    load_hf_tensors,
    load_model,
    named_hf_tensors,
    save_model,
)
from miles_core.types import UsageError

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=96, hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2
)
MOE = dict(
    COMMON, num_hidden_layers=3, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
    mlp_only_layers=[1],
)  # fmt: skip

HF_CASES = {
    "qwen3_moe_norm": ("Qwen3MoeConfig", dict(MOE, norm_topk_prob=True)),
    "qwen3_moe_nonorm_tied": ("Qwen3MoeConfig", dict(MOE, norm_topk_prob=False, tie_word_embeddings=True)),
    "qwen3_moe_step2": (
        "Qwen3MoeConfig",
        dict(MOE, mlp_only_layers=[], decoder_sparse_step=2, norm_topk_prob=True),
    ),
    "qwen3_tied": ("Qwen3Config", dict(COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_hidden_layers=2)),
    "llama_bias": ("LlamaConfig", dict(COMMON, num_hidden_layers=2, attention_bias=True, mlp_bias=True)),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            COMMON,
            num_hidden_layers=2,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "linear_rope": (
        "Qwen2Config",
        dict(
            COMMON, num_hidden_layers=2, rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)
        ),
    ),
}


def _perturb(model: torch.nn.Module) -> None:
    """Large random weights (norms near 1) so that every parameter visibly shapes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


def _hf_checkpoint(case: str, path) -> torch.nn.Module:
    cls_name, kw = HF_CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**kw)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _perturb(hf)
    hf.save_pretrained(path)
    return hf


def _ids(vocab: int = 96, b: int = 2, t: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = _hf_checkpoint(case, tmp_path)
    model = load_model(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert model.config.to_hf() == raw  # config round-trips, unknown keys included
    ids = _ids()
    with torch.no_grad():
        ref, got = hf(ids).logits, model(ids).logits
    assert ref.abs().max() > 0.1
    assert (ref - got).abs().max().item() <= 1e-4


def test_moe_layer_ids_follow_hf_rule(tmp_path):
    hf = _hf_checkpoint("qwen3_moe_step2", tmp_path)
    model = load_model(tmp_path)
    hf_moe = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert model.config.moe_layer_ids == hf_moe == [1]
    assert model.num_moe_layers == 1


def _miles_config(arch: str, **extra) -> ModelConfig:
    d = {
        "architectures": [arch], **COMMON, "num_hidden_layers": 2, "head_dim": 16, "initializer_range": 0.15,
        "rms_norm_eps": 1e-6, "eos_token_id": 3, **extra,
    }  # fmt: skip
    return ModelConfig.from_hf(d)


MOE_EXTRA = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)


@pytest.mark.parametrize(
    "arch,extra,shard_bytes",
    [
        ("Qwen3MoeForCausalLM", MOE_EXTRA, 5 * 2**30),
        ("Qwen3MoeForCausalLM", dict(MOE_EXTRA, tie_word_embeddings=True), 20_000),
        ("Qwen2ForCausalLM", {}, 20_000),
        ("LlamaForCausalLM", {}, 5 * 2**30),
    ],
)
def test_saved_checkpoint_loads_in_transformers(arch, extra, shard_bytes, tmp_path):
    torch.manual_seed(0)
    model = build_model(_miles_config(arch, **extra))
    tok_src = tmp_path / "tok"
    tok_src.mkdir()
    (tok_src / "tokenizer_config.json").write_text('{"eos_token": "<e>"}')
    out = save_model(model, tmp_path / "ckpt", tokenizer_src=tok_src, max_shard_bytes=shard_bytes)
    assert (out / "tokenizer_config.json").read_text() == '{"eos_token": "<e>"}'
    sharded = shard_bytes < 2**20
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert (out / "model.safetensors").is_file() == (not sharded)
    if sharded:
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        assert (hf(ids).logits - ref).abs().max().item() <= 1e-4
        assert (load_model(out)(ids).logits - ref).abs().max().item() <= 1e-6


def test_save_in_bf16_and_overwrite_atomically(tmp_path):
    model = build_model(_miles_config("Qwen3ForCausalLM"))
    save_model(model, tmp_path / "c")
    save_model(model, tmp_path / "c", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp or old folders left behind


def test_fused_expert_names_load(tmp_path):
    model = build_model(_miles_config("Qwen3MoeForCausalLM", **MOE_EXTRA))
    names = dict(named_hf_tensors(model, fused_experts=True))
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    save_file({k: v.clone().contiguous() for k, v in names.items()}, tmp_path / "model.safetensors")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(ids).logits, model(ids).logits)


def test_load_hf_tensors_in_place():
    cfg = _miles_config("Qwen3MoeForCausalLM", **MOE_EXTRA)
    torch.manual_seed(0)
    a, b = build_model(cfg), build_model(cfg)
    ptrs = {n: p.data_ptr() for n, p in a.named_parameters()}
    loaded = load_hf_tensors(a, named_hf_tensors(b), strict=True)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in loaded
    assert ptrs == {n: p.data_ptr() for n, p in a.named_parameters()}
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n
    with pytest.raises(UsageError, match="model.layers.9.mlp.gate.weight"):
        load_hf_tensors(a, [("model.layers.9.mlp.gate.weight", torch.zeros(8, 64))])
    with pytest.raises(UsageError, match="shape"):
        load_hf_tensors(a, [("model.norm.weight", torch.zeros(3))])
    with pytest.raises(UsageError, match="lacks tensor"):
        load_hf_tensors(a, [("model.norm.weight", torch.ones(64))], strict=True)


def test_usage_errors_for_broken_folders(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(UsageError, match="no config.json"):
        load_model(tmp_path)
    model = build_model(_miles_config("LlamaForCausalLM"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    with pytest.raises(UsageError, match="no model.safetensors"):
        load_model(tmp_path)
    tensors = {k: v.clone() for k, v in named_hf_tensors(model) if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_configs_raise_usage_error(change, match):
    d = {"architectures": ["LlamaForCausalLM"], **COMMON, "num_hidden_layers": 1, **change}
    with pytest.raises(UsageError, match=match):
        ModelConfig.from_hf(d)


def test_weight_loader_receives_tensors_of_swapped_modules():
    """A plugin's module that stores weights its own way gets them through ``weight_loader``."""
    from miles_core.model import swap_modules

    cfg = dict(MOE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    model = build_model(ModelConfig.from_hf(cfg))
    received = {}

    class Packed(torch.nn.Module):
        def __init__(self, prefix):
            super().__init__()
            self.prefix = prefix

        def weight_loader(self, rest, tensor):
            received[f"{self.prefix}.{rest}"] = tensor.clone()

    swap_modules(model, lambda name, m: Packed(name) if name.endswith(("q_proj", "experts")) else None)
    source = build_model(ModelConfig.from_hf(cfg))
    names = load_hf_tensors(model, named_hf_tensors(source))
    assert any(k.endswith("self_attn.q_proj.weight") for k in received)
    assert any(".experts.0.gate_proj.weight" in k for k in received)
    assert len(names) == len(list(named_hf_tensors(source)))
