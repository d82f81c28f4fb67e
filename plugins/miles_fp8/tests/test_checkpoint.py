"""HF FP8 checkpoints: `miles convert --to fp8` layout, bit-exact round trip, dequantize back, guards."""

from __future__ import annotations

import argparse
import json

import miles_fp8.plugin as fp8_plugin
import pytest
import torch
from fp8_helpers import make_args, plugin_manager, tiny_moe
from miles_fp8.checkpoint import convert_from_fp8, iter_tensors, read_config
from miles_fp8.quant import dequantize, quantize
from safetensors.torch import load_file

from miles_core import UsageError
from miles_core.model import load_model, save_model, write_hf_checkpoint


@pytest.fixture
def fp8_dir(tmp_path):
    model = tiny_moe(seed=4)
    save_model(model, tmp_path / "src")
    ns = argparse.Namespace(to="fp8", extra_high_precision_layers=["o_proj"])
    assert fp8_plugin.convert_checkpoint(
        args=ns, input_dir=str(tmp_path / "src"), output_dir=str(tmp_path / "fp8")
    )
    return model, tmp_path


def test_convert_writes_the_hf_fp8_layout(fp8_dir):
    model, tmp = fp8_dir
    cfg = read_config(tmp / "fp8")
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    t = dict(iter_tensors(tmp / "fp8"))
    q = t["model.layers.0.self_attn.q_proj.weight"]
    s = t["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 1)  # 96x96: 1 block
    assert t["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    for kept in ("model.layers.0.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"):  # fmt: skip
        assert t[kept].dtype == torch.float32 and kept + "_scale_inv" not in t
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    q_mem, s_mem = quantize(w, (128, 128))
    assert torch.equal(q.view(torch.uint8), q_mem.view(torch.uint8)) and torch.equal(s, s_mem)


def test_fp8_checkpoint_round_trips_bit_exactly(fp8_dir):
    _, tmp = fp8_dir
    cfg, tensors = read_config(tmp / "fp8"), dict(iter_tensors(tmp / "fp8"))
    write_hf_checkpoint(tensors, cfg, tmp / "again")
    assert (tmp / "again" / "model.safetensors").read_bytes() == (
        tmp / "fp8" / "model.safetensors"
    ).read_bytes()
    back = load_file(str(tmp / "again" / "model.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8))
    assert json.loads((tmp / "again" / "config.json").read_text()) == cfg


def test_dequantized_checkpoint_loads_and_is_close(fp8_dir):
    model, tmp = fp8_dir
    convert_from_fp8(tmp / "fp8", tmp / "f32", torch.float32)
    assert "quantization_config" not in read_config(tmp / "f32")
    back = load_model(tmp / "f32")
    w, wb = model.model.layers[1].mlp.experts.down_proj, back.model.layers[1].mlp.experts.down_proj
    rel = float((wb - w).norm() / w.norm())
    assert 0 < rel < 0.05
    q, s = quantize(w.detach()[2], (128, 128))
    assert torch.equal(wb.detach()[2], dequantize(q, s, (128, 128)))


def test_training_from_an_fp8_checkpoint_asks_for_a_dequantized_copy(fp8_dir):
    _, tmp = fp8_dir
    with pytest.raises(UsageError, match="--to bf16"):
        make_args(plugin_manager(), "--fp8-recipe", "blockwise", "--hf-checkpoint", str(tmp / "fp8"))


def test_nan_in_a_checkpoint_weight_names_it(tmp_path):
    model = tiny_moe()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 3] = float("nan")
    save_model(model, tmp_path / "src")
    ns = argparse.Namespace(to="fp8", extra_high_precision_layers=[])
    with pytest.raises(UsageError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        fp8_plugin.convert_checkpoint(
            args=ns, input_dir=str(tmp_path / "src"), output_dir=str(tmp_path / "o")
        )
    assert not (tmp_path / "o").exists()  # atomic: nothing half-written
