"""MTP heads in HF checkpoints: `miles convert --add-mtp-layers`, DeepSeek-V3 names, load, save, sync."""

from __future__ import annotations

import json

import pytest
import torch
from miles_specrl.mtp import attach_mtp, load_mtp_weights
from specrl_helpers import checkpoint_with_mtp, make_args, plugin_manager, tiny_model

from miles_core import UsageError
from miles_core.model import load_hf_tensors, load_model, named_hf_tensors, save_model


def test_convert_writes_deepseek_names_and_config(tmp_path):
    ckpt = checkpoint_with_mtp(tmp_path, tiny_model(), num_layers=2)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 2
    names = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    for d in (2, 3):  # num_hidden_layers = 2
        for leaf in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.q_proj", "mlp.down_proj"):
            assert f"model.layers.{d}.{leaf}.weight" in names
    assert load_model(ckpt).config.num_hidden_layers == 2  # the core loads it, skipping the MTP tensors
    with pytest.raises(UsageError, match="already has MTP"):
        checkpoint_with_mtp(tmp_path / "again", load_model(ckpt), 1)


def test_load_save_roundtrip_and_weight_sync(tmp_path):
    ckpt = checkpoint_with_mtp(tmp_path, tiny_model(), num_layers=1)
    model = load_model(ckpt)
    heads = attach_mtp(model, 1)
    load_mtp_weights(heads, ckpt)
    names = dict(named_hf_tensors(model))
    assert "model.layers.2.eh_proj.weight" in names and not any(n.startswith("mtp.") for n in names)
    with torch.no_grad():
        heads.layers[0].eh_proj.weight.add_(1.0)
    out = save_model(model, tmp_path / "saved")
    again = load_model(out)
    heads2 = attach_mtp(again, 1)
    load_mtp_weights(heads2, out)
    assert torch.equal(heads2.layers[0].eh_proj.weight, heads.layers[0].eh_proj.weight)
    # Weight sync (trainer -> engine) goes through the same names.
    engine_model = load_model(ckpt, dtype=torch.bfloat16)
    attach_mtp(engine_model, 1)
    load_hf_tensors(engine_model, named_hf_tensors(model))
    assert torch.equal(engine_model.mtp.layers[0].eh_proj.weight, heads.layers[0].eh_proj.weight.bfloat16())


def test_missing_heads_name_the_fix(tmp_path):
    plain = save_model(tiny_model(), tmp_path / "plain")
    pm = plugin_manager()
    args = make_args(pm, "--hf-checkpoint", str(plain), "--mtp-num-layers", "1")
    with pytest.raises(UsageError, match="--add-mtp-layers 1"):
        pm.hook.configure_model(args=args, model=load_model(plain), role="train")


def test_convert_hook(tmp_path):
    import argparse

    import miles_specrl.plugin as plugin

    plain = save_model(tiny_model(), tmp_path / "plain")
    parser = argparse.ArgumentParser()
    plugin.add_convert_arguments(parser)
    args = parser.parse_args(["--add-mtp-layers", "1"])
    assert plugin.convert_checkpoint(args=args, input_dir=str(plain), output_dir=str(tmp_path / "o")) is True
    assert plugin.convert_checkpoint(args=parser.parse_args([]), input_dir="x", output_dir="y") is None
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_nextn_predict_layers"] == 1
