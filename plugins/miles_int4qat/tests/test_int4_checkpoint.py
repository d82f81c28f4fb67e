"""compressed-tensors pack-quantized export/import, and `miles convert --to int4` / `--to bf16`."""

from __future__ import annotations

import json

import pytest
import torch
from int4_helpers import checkpoint, plugin_manager
from miles_int4qat.checkpoint import export_int4, import_int4, iter_dequantized
from miles_int4qat.fake_quant import fake_quant_values
from safetensors import safe_open

import miles_core.plugins
from miles_core import UsageError, cli
from miles_core.model import load_model


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_export_writes_the_pack_quantized_layout(tmp_path):
    src = checkpoint(tmp_path)
    out = export_int4(src, tmp_path / "int4", group_size=16)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (
        4,
        "int",
        True,
        "group",
        16,
    )
    assert "lm_head" in qc["ignore"] and "model.layers.0.self_attn.q_proj" in qc["ignore"]
    assert "model.layers.0.mlp.gate" in qc["ignore"]
    t = _tensors(out)
    base = "model.layers.1.mlp.experts.5.down_proj"
    assert f"{base}.weight" not in t
    assert t[f"{base}.weight_packed"].dtype == torch.int32 and t[f"{base}.weight_packed"].shape == (32, 4)
    assert t[f"{base}.weight_scale"].shape == (32, 2)
    assert t[f"{base}.weight_shape"].tolist() == [32, 32] and t[f"{base}.weight_shape"].dtype == torch.int64
    assert "model.layers.0.self_attn.q_proj.weight" in t  # out of the experts scope: kept as is
    assert (out / "tokenizer.json").is_file()


def test_import_gives_back_exactly_the_quantized_weights(tmp_path):
    src = checkpoint(tmp_path)
    out = export_int4(src, tmp_path / "int4", group_size=16, scope="all-linear")
    original = _tensors(src)
    back = dict(iter_dequantized(out))
    assert back.keys() == original.keys()
    for name, t in original.items():
        expect = fake_quant_values(t, 16) if name.endswith("proj.weight") and ".mlp.gate." not in name else t
        assert torch.equal(back[name], expect), name
    plain = import_int4(out, tmp_path / "plain", dtype=torch.float32)
    model = load_model(plain)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj[0, :32], back[
        "model.layers.0.mlp.experts.0.gate_proj.weight"
    ])  # fmt: skip


def test_miles_convert_to_int4_and_back(tmp_path, monkeypatch):
    src = checkpoint(tmp_path)
    monkeypatch.setattr(miles_core.plugins, "get_plugin_manager", lambda **kw: plugin_manager())
    argv = ["convert", "--hf-checkpoint", str(src), "--output", str(tmp_path / "q"), "--to", "int4"]
    assert cli.main([*argv, "--int4-group-size", "32"]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 32
    back = [
        "convert",
        "--hf-checkpoint",
        str(tmp_path / "q"),
        "--output",
        str(tmp_path / "b"),
        "--to",
        "bf16",
    ]
    assert cli.main(back) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(UsageError, match="does not divide the input dimension 32"):
        export_int4(src, tmp_path / "bad", group_size=64)
    assert not (tmp_path / "bad").exists()
