"""Read and write HF checkpoints (config.json + safetensors, single file or sharded with an index).

On disk MoE experts use HF's per-expert names (`mlp.experts.{e}.gate_proj.weight`, as transformers 4 and 5
both write); in memory they are fused into `Experts.gate_up_proj` / `down_proj`. Loading also accepts the
fused names. `named_hf_tensors` / `load_hf_tensors` are the same mapping used for weight sync.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from miles_core.atomic import atomic_dir
from miles_core.errors import UsageError
from miles_core.model.config import ModelConfig
from miles_core.model.transformer import CausalLM, build_model

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)  # fmt: skip
_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")  # stored by some old checkpoints; recomputed here


def named_hf_tensors(model: CausalLM, *, fused_experts: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every weight: detached views of the parameters, no copies.

    Experts are split into HF's per-expert names unless `fused_experts` (transformers 5 in-memory names).
    A tied lm_head is skipped, as HF checkpoints omit it.
    """
    return hf_tensors_of_state(
        model.state_dict(keep_vars=True).items(),
        model.config.tie_word_embeddings,
        fused_experts=fused_experts,
    )


def hf_tensors_of_state(
    state: Iterable[tuple[str, torch.Tensor]], tied: bool, *, fused_experts: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """`named_hf_tensors` of a model's ``(state_dict name, tensor)`` pairs, e.g. full tensors gathered
    one at a time from a sharded model; ``tied`` is the config's ``tie_word_embeddings``."""
    for name, t in state:
        t = t.detach()
        if tied and name == "lm_head.weight":
            continue
        if not fused_experts and t.dim() == 3 and name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}{e}.up_proj.weight", t[e, inter:]
        elif not fused_experts and t.dim() == 3 and name.endswith(".experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _target(params: dict[str, torch.Tensor], name: str) -> tuple[str, torch.Tensor] | None:
    """(coverage key, destination view) for an HF tensor name, or None if the model has no such weight."""
    if name in params:
        return name, params[name]
    m = _EXPERT_RE.match(name)
    if m is None:
        return None
    prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
    fused = params.get(f"{prefix}.down_proj" if kind == "down_proj" else f"{prefix}.gate_up_proj")
    if fused is None or fused.dim() != 3 or e >= fused.shape[0]:
        return None
    if kind == "down_proj":
        return name, fused[e]
    inter = fused.shape[1] // 2
    return name, fused[e, :inter] if kind == "gate_proj" else fused[e, inter:]


def _expected_names(model: CausalLM) -> set[str]:
    return {n for n, _ in named_hf_tensors(model)}


def load_hf_tensors(
    model: CausalLM, named: Iterable[tuple[str, torch.Tensor]], *, strict: bool = False
) -> list[str]:
    """Copy HF-named tensors into the model's parameters in place (no reallocation); returns the names.

    Per-expert and fused expert names are both accepted. Unknown names or wrong shapes raise UsageError;
    with `strict`, so does any model weight left unset. A module that stores its weights in another format
    (a quantized linear or expert block swapped in by a plugin) defines ``weight_loader(name, tensor)``;
    tensors under it are handed to that loader with the rest of the name (``"weight"``,
    ``"3.gate_proj.weight"``), so the plugin decides how to store them.
    """
    params = model.state_dict(keep_vars=True)
    loaded: list[str] = []
    covered: set[str] = set()
    with torch.no_grad():
        for name, src in named:
            if _IGNORED_RE.search(name):
                continue
            custom = _module_loader(model, name)
            if custom is not None:
                loader, rest = custom
                loader(rest, src)
                loaded.append(name)
                continue
            hit = _target(params, name)
            if hit is None:
                raise UsageError(
                    f"checkpoint tensor {name!r} has no counterpart in the {model.config.architecture} "
                    "model; check that config.json matches the weights."
                )
            key, dst = hit
            if tuple(dst.shape) != tuple(src.shape):
                raise UsageError(
                    f"checkpoint tensor {name!r} has shape {tuple(src.shape)} but the model expects "
                    f"{tuple(dst.shape)}; check that config.json matches the weights."
                )
            dst.copy_(src)
            loaded.append(name)
            covered.add(key)
    if strict:
        _check_covered(model, covered)
    return loaded


def _module_loader(model: CausalLM, name: str):
    """`(module.weight_loader, rest of name)` for the deepest module on the path of `name`, if any."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        loader = getattr(module, "weight_loader", None)
        return (loader, ".".join(parts[cut:])) if callable(loader) else None
    return None


def _check_covered(model: CausalLM, covered: set[str]) -> None:
    covered = set(covered)
    for fused in [n for n in covered if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        covered |= {n for n, _ in _split_names(model, fused)}
    missing = sorted(_expected_names(model) - covered)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UsageError(
            f"checkpoint lacks tensor {missing[0]!r}{more}; use a complete checkpoint for this config.json."
        )


def _split_names(model: CausalLM, fused: str) -> Iterator[tuple[str, None]]:
    n = model.get_parameter(fused).shape[0]
    prefix = fused.rsplit(".", 1)[0]
    kinds = ("gate_proj", "up_proj") if fused.endswith("gate_up_proj") else ("down_proj",)
    for e in range(n):
        for kind in kinds:
            yield f"{prefix}.{e}.{kind}.weight", None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder: every shard its index names, or the single file."""
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise UsageError(
                    f"shard {f} listed in {index} is missing; re-download or re-save the checkpoint."
                )
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise UsageError(
        f"no model.safetensors or {INDEX_NAME} in {path}; point --hf-checkpoint at a folder with "
        "safetensors weights (convert .bin checkpoints with transformers' save_pretrained)."
    )


def safetensors_problem(file: Path) -> str | None:
    """Why ``file`` is not a readable safetensors file (its header and length are checked), or None."""
    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            return None
    except (SafetensorError, OSError) as err:
        return " ".join(str(err).split())


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of these safetensors files, in file order, read on the CPU.

    :raises UsageError: naming the file, when one is truncated or not safetensors at all.
    """
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError) as err:
            raise UsageError(
                f"{f} is truncated or not a safetensors file ({' '.join(str(err).split())}); "
                "re-download or re-save the checkpoint."
            ) from None
        with fh:
            for key in fh.keys():
                yield key, fh.get_tensor(key)


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"checkpoint folder {path} does not exist; pass an existing HF model folder.")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{path} has no config.json; pass a folder saved by save_pretrained or save_model.")
    try:
        data = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{cfg} is not valid JSON ({err}); fix it or re-download the checkpoint.") from None
    if not isinstance(data, dict):
        raise UsageError(f"{cfg} holds a JSON {type(data).__name__}, not an object; fix or re-download it.")
    return ModelConfig.from_hf(data)


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build the model described by `path/config.json` and fill it from the folder's safetensors."""
    path = Path(path)
    config = load_config(path)
    files = weight_files(path)
    model = build_model(config, dtype=dtype, device=device, init=False)
    params = model.state_dict(keep_vars=True)
    unknown: list[str] = []

    def known(stream: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in stream:
            if _IGNORED_RE.search(name) or _target(params, name) is not None:
                yield name, t
            else:
                unknown.append(name)

    load_hf_tensors(model, known(iter_safetensors(files)), strict=True)
    if unknown:  # e.g. MTP heads that a plugin loads separately
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unknown), unknown[0])
    return model


def _plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def save_model(
    model: CausalLM,
    out_dir: str | Path,
    tokenizer_src: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an HF-loadable checkpoint folder atomically: config.json, safetensors, tokenizer files."""
    tensors = dict(named_hf_tensors(model))
    out_dtype = dtype or next(iter(tensors.values())).dtype
    config = model.config.to_hf()
    set_config_dtype(config, out_dtype)
    return write_hf_checkpoint(tensors, config, out_dir, tokenizer_src, max_shard_bytes, dtype=out_dtype)


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Record the weights' dtype in an HF ``config`` dict: under ``dtype`` where the config already uses
    that key (transformers 5) and has no ``torch_dtype``, else under ``torch_dtype``."""
    key = "dtype" if "dtype" in config and "torch_dtype" not in config else "torch_dtype"
    config[key] = str(dtype).removeprefix("torch.")


def write_hf_checkpoint(
    tensors: dict[str, torch.Tensor],
    config: dict,
    out_dir: str | Path,
    tokenizer_src: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
    shards: list[list[str]] | None = None,
) -> Path:
    """Write HF-named ``tensors`` + ``config`` as a checkpoint folder, atomically.

    One ``model.safetensors``, or shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``
    (or as given: ``shards`` lists the tensor names of each file, e.g. to keep a source's layout);
    tokenizer files are copied from ``tokenizer_src``. Floating tensors are cast to ``dtype`` if given
    (quantized checkpoints pass None and keep their fp8/int32 tensors as they are).
    """
    if tokenizer_src is not None and not Path(tokenizer_src).is_dir():
        raise UsageError(f"tokenizer folder {tokenizer_src} does not exist; pass the original HF checkpoint.")

    def stored(t: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        # clone: per-expert slices share storage, which safetensors refuses to write.
        return t.detach().to(device="cpu", dtype=cast).clone().contiguous()

    def nbytes(t: torch.Tensor) -> int:
        cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.numel() * torch.empty(0, dtype=cast).element_size()

    if shards is None:
        shards = _plan_shards([(n, nbytes(t)) for n, t in tensors.items()], max_shard_bytes)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        for i, names in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            save_file({n: stored(tensors[n]) for n in names}, str(tmp / fname), metadata={"format": "pt"})
            # safetensors creates its files 0600; give them the mode (umask) of the files written here
            os.chmod(tmp / fname, (tmp / "config.json").stat().st_mode & 0o777)
            weight_map.update(dict.fromkeys(names, fname))
        if len(shards) > 1:
            total = sum(nbytes(t) for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_src is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_src) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
    return out_dir
