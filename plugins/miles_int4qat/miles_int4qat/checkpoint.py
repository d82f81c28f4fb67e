"""Export and import INT4 checkpoints in compressed-tensors' ``pack-quantized`` layout.

Every quantized ``<module>.weight`` becomes ``<module>.weight_packed`` (int32 ``[out, in/8]``),
``<module>.weight_scale`` (``[out, in/group]``, the source dtype) and ``<module>.weight_shape`` (int64
``[out, in]``); config.json gains a ``quantization_config`` (group strategy, symmetric, 4 bits, ``ignore``
listing the linear layers left in full precision), which is what SGLang's and vLLM's compressed-tensors
loaders read. `export_int4` writes one; `iter_dequantized` / `import_int4` read one back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from miles_core import UsageError
from miles_core.api import iter_safetensors, weight_files, write_hf_checkpoint
from miles_int4qat.packing import check_group_size, dequantize, quantize_pack

_EXPERT_W = re.compile(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_DENSE_W = re.compile(r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")
_ROUTER_W = re.compile(r"\.mlp\.gate\.weight$")


def in_scope(name: str, scope: str) -> bool:
    """Whether the HF tensor ``name`` is quantized under ``scope`` ("experts" or "all-linear")."""
    return bool(_EXPERT_W.search(name) or (scope == "all-linear" and _DENSE_W.search(name)))


def _is_linear(name: str) -> bool:
    return bool(_EXPERT_W.search(name) or _DENSE_W.search(name) or _ROUTER_W.search(name))


def iter_scope_tensors(path: str | Path, scope: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The unquantized checkpoint's tensors in ``scope``, as stored (e.g. fp32 masters)."""
    for f in weight_files(Path(path)):
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for key in fh.keys():
                if in_scope(key, scope):
                    yield key, fh.get_tensor(key)


def quantization_config(group_size: int, ignore: list[str]) -> dict:
    """The config.json ``quantization_config`` of a W4A16 symmetric group-quantized checkpoint."""
    weights = {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size,
        "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
        "block_structure": None,
    }  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


def export_int4(
    input_dir: str | Path, output_dir: str | Path, group_size: int = 128, scope: str = "experts"
) -> Path:
    """Write ``input_dir`` (HF safetensors) as a pack-quantized INT4 checkpoint at ``output_dir``."""
    src, out = Path(input_dir), Path(output_dir)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise UsageError(f"{src} is already quantized; convert from the unquantized checkpoint.")
    tensors: dict[str, torch.Tensor] = {}
    shards, ignore = [], {"lm_head"}  # one output file per input file: the source's layout
    for f in weight_files(src):
        first = len(tensors)
        for name, t in iter_safetensors([f]):
            if not in_scope(name, scope):
                if _is_linear(name):
                    ignore.add(name.removesuffix(".weight"))
                tensors[name] = t.contiguous()
                continue
            check_group_size(t.shape[-1], group_size, name)
            packed, scale = quantize_pack(t, group_size)
            base = name.removesuffix(".weight")
            tensors[f"{base}.weight_packed"] = packed.contiguous()
            tensors[f"{base}.weight_scale"] = scale.to(t.dtype).contiguous()
            tensors[f"{base}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        shards.append(list(tensors)[first:])
    config["quantization_config"] = quantization_config(group_size, sorted(ignore))
    return write_hf_checkpoint(tensors, config, out, tokenizer_src=src, shards=shards)


def int4_group_size(path: str | Path) -> int | None:
    """The group size of a pack-quantized INT4 checkpoint at ``path``, or None if it is not one."""
    cfg = Path(path) / "config.json"
    qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    if not qc or qc.get("format") != "pack-quantized":
        return None
    groups = list(qc.get("config_groups", {}).values())
    w = groups[0].get("weights", {}) if groups else {}
    if w.get("num_bits") != 4 or w.get("strategy") != "group" or not w.get("symmetric"):
        raise UsageError(
            f"{path} holds a pack-quantized checkpoint other than INT4 symmetric group; not supported."
        )
    return int(w["group_size"])


def iter_dequantized(
    path: str | Path, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a pack-quantized checkpoint with every INT4 weight dequantized to ``.weight``."""
    path = Path(path)
    group_size = int4_group_size(path)
    if group_size is None:
        raise UsageError(
            f"{path} is not a pack-quantized INT4 checkpoint (config.json has no such quantization)."
        )
    for f in weight_files(path):
        tensors = dict(iter_safetensors([f]))
        for name, t in tensors.items():
            if name.endswith((".weight_scale", ".weight_shape")):
                continue
            if not name.endswith(".weight_packed"):
                yield name, t if dtype is None or not t.is_floating_point() else t.to(dtype)
                continue
            base = name.removesuffix(".weight_packed")
            scale, shape = tensors[f"{base}.weight_scale"], tensors[f"{base}.weight_shape"].tolist()
            w = dequantize(t, scale, group_size, dtype or scale.dtype)
            yield f"{base}.weight", w[..., : shape[-1]].reshape(shape)


def import_int4(input_dir: str | Path, output_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a pack-quantized INT4 checkpoint back as a plain HF checkpoint in ``dtype`` (dequantized)."""
    src, out = Path(input_dir), Path(output_dir)
    config = json.loads((src / "config.json").read_text())
    tensors = {n: t.contiguous() for n, t in iter_dequantized(src, dtype)}
    config.pop("quantization_config", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return write_hf_checkpoint(tensors, config, out, tokenizer_src=src, shards=[list(tensors)])
