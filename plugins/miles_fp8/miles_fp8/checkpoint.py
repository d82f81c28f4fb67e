"""HF FP8 checkpoints: the layout Qwen3-FP8 and DeepSeek-V3 ship, read and written by miles.

Each quantized linear weight is stored as float8_e4m3fn ``<name>.weight`` plus fp32
``<name>.weight_scale_inv`` [ceil(out/128), ceil(in/128)] (the decode multiplier per 128x128 block), and
config.json carries ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
"dynamic", "weight_block_size": [128, 128]}``. Router, lm_head, embeddings and norms stay high precision.
Tensors are written as read, so a checkpoint loaded and saved again is bit-identical.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from miles_core import UsageError
from miles_core.api import iter_safetensors, set_config_dtype, weight_files, write_hf_checkpoint
from miles_fp8.linear import is_high_precision
from miles_fp8.quant import BLOCK, FP8_DTYPE, dequantize, quantize

SCALE_SUFFIX = "_scale_inv"


def quantization_config(keep: Iterable[str] = ()) -> dict:
    cfg = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    if keep:
        cfg["modules_to_not_convert"] = list(keep)
    return cfg


def read_config(path: str | Path) -> dict:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{path} has no config.json; point --hf-checkpoint at an HF checkpoint folder.")
    return json.loads(cfg.read_text())


def is_fp8_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "fp8"


def _block_tile(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    block = qc.get("weight_block_size")
    if not block or len(block) != 2:
        raise UsageError(
            "this FP8 checkpoint has no 2-entry weight_block_size in quantization_config; only blockwise "
            "FP8 checkpoints (e.g. [128, 128]) are supported."
        )
    return int(block[0]), int(block[1])


def iter_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of a safetensors checkpoint folder (single file or sharded with an index)."""
    return iter_safetensors(weight_files(Path(path)))


def should_quantize(name: str, tensor: torch.Tensor, keep: Iterable[str] = ()) -> bool:
    """A 2-D ``*.weight`` of a module that is not kept high precision (router, lm_head, embeddings, keep)."""
    return name.endswith(".weight") and tensor.dim() == 2 and not is_high_precision(name[:-7], tuple(keep))


def quantize_tensors(
    named: Iterable[tuple[str, torch.Tensor]], keep: Iterable[str] = ()
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors -> FP8 checkpoint tensors: eligible weights become (fp8 weight, fp32 weight_scale_inv)."""
    keep = tuple(keep)
    for name, t in named:
        if should_quantize(name, t, keep):
            q, s = quantize(t, (BLOCK, BLOCK), name=name)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, t


def dequantize_tensors(
    named: dict[str, torch.Tensor], config: dict, dtype: torch.dtype = torch.bfloat16
) -> Iterator[tuple[str, torch.Tensor]]:
    """FP8 checkpoint tensors -> plain HF tensors in `dtype` (scales folded in and dropped)."""
    tile = _block_tile(config)
    for name, t in named.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == FP8_DTYPE:
            scale = named.get(name + SCALE_SUFFIX)
            if scale is None:
                raise UsageError(
                    f"FP8 tensor {name!r} has no {name + SCALE_SUFFIX!r}; the checkpoint is broken."
                )
            yield name, dequantize(t, scale, tile, dtype)
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t


def convert_to_fp8(input_dir: str | Path, output_dir: str | Path, keep: Iterable[str] = ()) -> Path:
    """`miles convert --to fp8`: quantize an HF checkpoint's linear weights to blockwise e4m3."""
    config = read_config(input_dir)
    if is_fp8_checkpoint(input_dir):
        raise UsageError(
            f"{input_dir} is already an FP8 checkpoint; pass a bf16/fp32 checkpoint to --to fp8."
        )
    tensors = dict(quantize_tensors(iter_tensors(input_dir), keep))
    config["quantization_config"] = quantization_config(keep)
    return write_hf_checkpoint(tensors, config, output_dir, tokenizer_src=input_dir)


def convert_from_fp8(input_dir: str | Path, output_dir: str | Path, dtype: torch.dtype) -> Path:
    """`miles convert --to bf16|fp32`: dequantize an FP8 checkpoint so the trainer can load it."""
    config = read_config(input_dir)
    if not is_fp8_checkpoint(input_dir):
        raise UsageError(
            f"{input_dir} is not an FP8 checkpoint (no quantization_config); nothing to dequantize."
        )
    tensors = dict(dequantize_tensors(dict(iter_tensors(input_dir)), config, dtype))
    config.pop("quantization_config")
    set_config_dtype(config, dtype)
    return write_hf_checkpoint(tensors, config, output_dir, tokenizer_src=input_dir)
