"""`miles convert --to torch_dist` / `--from torch_dist`: HF <-> megatron-core's torch_dist checkpoint in
slime's --save layout, bitwise round trips and the refusals (split from test_megatron.py, whose
checkpoints and megatron-state clean-up it shares)."""

from __future__ import annotations

import pytest
import torch
from test_megatron import _leave_no_megatron_state, _read, needs_mcore, write_ckpts  # noqa: F401 -- a fixture

from miles_core.model import write_hf_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_ckpts(tmp_path_factory)


def _convert(*argv):
    from miles_core.cli import main

    assert main(["convert", *map(str, argv)]) == 0


@needs_mcore
@pytest.mark.parametrize("arch, dtype", [("qwen3_moe", torch.float32), ("qwen2", torch.bfloat16)])
def test_torch_dist_round_trip_is_bitwise(ckpts, tmp_path, arch, dtype):
    import json

    from torch.distributed.checkpoint import FileSystemReader

    src = tmp_path / "hf"
    config = json.loads((ckpts[arch] / "config.json").read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_hf_checkpoint(_read(ckpts[arch]), config, src, tokenizer_src=ckpts[arch], dtype=dtype)
    _convert("--hf-checkpoint", src, "--output", tmp_path / "td", "--to", "torch_dist")
    # slime's layout: a --save folder whose tracker names release/, megatron-core's torch_dist inside.
    assert (tmp_path / "td" / "latest_checkpointed_iteration.txt").read_text() == "release"
    meta = json.loads((tmp_path / "td" / "release" / "metadata.json").read_text())
    assert meta["sharded_backend"] == "torch_dist"
    stored = FileSystemReader(str(tmp_path / "td" / "release")).read_metadata().state_dict_metadata
    if arch == "qwen3_moe":  # layers differ (dense 0, MoE 1): one key per layer; experts stacked
        assert stored["decoder.layers.1.self_attention.linear_qkv.weight"].size == torch.Size([64, 32])
        experts = stored["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
        assert experts.size == torch.Size([8, 32, 32])
    else:  # alike layers are stacked on a leading layer axis
        assert stored["decoder.layers.self_attention.linear_qkv.weight"].size == torch.Size([2, 64, 32])
        assert stored["decoder.layers.self_attention.linear_qkv.bias"].size == torch.Size([2, 64])
    _convert("--hf-checkpoint", src, "--output", tmp_path / "back", "--from", "torch_dist",
             "--input-dir", tmp_path / "td")  # fmt: skip
    want, got = _read(src), _read(tmp_path / "back")
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == dtype and torch.equal(got[name], t), name
    assert (tmp_path / "back" / "tokenizer.json").is_file()


@needs_mcore
def test_torch_dist_refusals(ckpts, tmp_path, capsys):
    from miles_core.cli import main

    src, out = str(ckpts["llama"]), str(tmp_path / "o")
    assert main(["convert", "--hf-checkpoint", src, "--output", out, "--from", "torch_dist"]) == 2
    assert "--from torch_dist writes an HF checkpoint from --input-dir CKPT" in capsys.readouterr().err
    assert (
        main(["convert", "--hf-checkpoint", src, "--output", out, "--from", "torch_dist", "--input-dir", src])
        == 2
    )
    assert "holds neither latest_checkpointed_iteration.txt nor metadata.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
