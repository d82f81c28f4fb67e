"""DeepSeek-V3-style multi-token-prediction (MTP) heads for the built-in model, and their HF checkpoint I/O.

Depth d combines RMSNorm(embedding of the token d ahead) with RMSNorm(the previous depth's hidden state)
through ``eh_proj`` (2H -> H), runs one dense decoder layer of the core model and a final norm, and predicts
with the policy's own (shared) embedding and LM head. On disk depth d is ``model.layers.{L + d}.*`` (L =
``num_hidden_layers``) with ``enorm`` / ``hnorm`` / ``eh_proj`` / ``shared_head.norm`` and
``num_nextn_predict_layers`` in config.json, as DeepSeek-V3 checkpoints name them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from miles_core import UsageError
from miles_core.api import (
    CausalLM,
    DecoderLayer,
    KVCache,
    ModelConfig,
    RMSNorm,
    StepContext,
    atomic_dir,
    cache_context,
    load_config,
)

NEXTN_KEY = "num_nextn_predict_layers"
INDEX_NAME = "model.safetensors.index.json"
# Tensors DeepSeek-V3 stores per depth that are shared with the main model here (not saved, ignored on load).
_SHARED_RE = re.compile(r"^(embed_tokens|shared_head\.head)\.weight$")


def _dense_config(config: ModelConfig) -> ModelConfig:
    """The config of an MTP decoder layer: dense MLP (MoE models fall back to top-k x expert width)."""
    inter = config.intermediate_size or config.moe_intermediate_size * max(1, config.num_experts_per_tok)
    return dataclasses.replace(config, intermediate_size=inter, is_moe=False, num_hidden_layers=1)


class MTPLayer(DecoderLayer):
    """One MTP depth. ``layer_idx`` 0: at inference it writes layer 0 of the draft's own `KVCache`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(_dense_config(config), layer_idx=0, moe_index=None)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(h, eps)

    def forward(self, hidden: torch.Tensor, emb: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, ...]:
        """hidden, emb [B, T, H] -> (block output for the next depth, normed output for the LM head)."""
        # Embedding first, then hidden state: the order of SGLang's / HF's DeepSeek-V3 MTP layer.
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        x = super().forward(x, ctx, None)
        return x, self.shared_head.norm(x)


class MTPHeads(nn.Module):
    """``num_layers`` MTP depths; attached to a `CausalLM` as ``model.mtp``."""

    def __init__(self, config: ModelConfig, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(MTPLayer(config) for _ in range(num_layers))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range or 0.02
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
            elif isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)


def step_context(
    model: CausalLM,
    position_ids: torch.Tensor,
    dtype: torch.dtype,
    cache: KVCache | None = None,
    slots: torch.Tensor | None = None,
    kv_len: int | None = None,
    contiguous_slots: bool = False,
) -> StepContext:
    """The `StepContext` an MTP layer needs, built like `CausalLM.forward` builds its own (`kv_len` and
    `contiguous_slots` as there: the static speculative step passes both, so it never syncs)."""
    cos, sin = model.model.rotary_emb(position_ids, dtype)
    if cache is None:
        return StepContext(cos=cos, sin=sin)
    return cache_context(
        cos, sin, cache, slots, position_ids, model.config.head_dim, kv_len, contiguous_slots
    )


def head_logits(model: CausalLM, normed: torch.Tensor) -> torch.Tensor:
    """Logits of an MTP depth through the policy's LM head, detached: MTP never trains shared weights."""
    return F.linear(normed, model.lm_head.weight.detach())


def embed(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, model.model.embed_tokens.weight.detach())


# ------------------------------------------------------------------------------------------ naming


def hf_prefix(config: ModelConfig, depth: int) -> str:
    return f"model.layers.{config.num_hidden_layers + depth}."


def _rename_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``mtp.layers.d.X`` -> ``model.layers.{L+d}.X``, so `named_hf_tensors`,
    `load_hf_tensors` (weight sync) and `save_model` all see DeepSeek-V3 names."""
    head = f"{prefix}mtp.layers."
    for key in [k for k in state_dict if k.startswith(head)]:
        depth, _, rest = key[len(head) :].partition(".")
        state_dict[f"{prefix}{hf_prefix(module.config, int(depth))}{rest}"] = state_dict.pop(key)


def attach_mtp(model: CausalLM, num_layers: int) -> MTPHeads:
    """Add ``model.mtp`` (on the model's device and dtype) and advertise it in the saved config.json."""
    p = next(model.parameters())
    with torch.device("meta"):
        heads = MTPHeads(model.config, num_layers)
    heads = heads.to(dtype=p.dtype).to_empty(device=p.device)
    heads.init_weights()
    model.mtp = heads
    model.register_state_dict_post_hook(_rename_hook)
    model.config.raw[NEXTN_KEY] = num_layers
    return heads


# ------------------------------------------------------------------------------------------ checkpoint I/O


def _weight_files(path: Path) -> dict[str, Path]:
    """{tensor name: file} of an HF checkpoint folder (sharded with an index, or one model.safetensors)."""
    index = path / INDEX_NAME
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"no model.safetensors or {INDEX_NAME} in {path}; pass an HF checkpoint folder.")
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def load_mtp_weights(heads: MTPHeads, path: str | Path) -> None:
    """Fill ``heads`` from the ``model.layers.{L+d}.*`` tensors of the checkpoint at ``path``."""
    path = Path(path)
    config = load_config(path)
    have = int(config.raw.get(NEXTN_KEY) or 0)
    if have < len(heads.layers):
        raise UsageError(
            f"{path} has {have} MTP layers but --mtp-num-layers is {len(heads.layers)}; run `miles convert "
            f"--hf-checkpoint {path} --output OUT --add-mtp-layers {len(heads.layers)}` and train from OUT."
        )
    files = _weight_files(path)
    params = heads.state_dict()
    seen: set[str] = set()
    with torch.no_grad():
        for d in range(len(heads.layers)):
            prefix = hf_prefix(config, d)
            for name, file in files.items():
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix) :]
                if _SHARED_RE.match(rest):
                    continue
                key = f"layers.{d}.{rest}"
                if key not in params:
                    raise UsageError(f"MTP tensor {name!r} in {path} is unknown here; check config.json.")
                with safe_open(str(file), framework="pt") as fh:
                    params[key].copy_(fh.get_tensor(name))
                seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise UsageError(f"{path} lacks MTP tensor {missing[0]!r}; re-create it with miles convert.")


def add_mtp_layers(input_dir: str | Path, output_dir: str | Path, num_layers: int, seed: int = 0) -> Path:
    """Copy an HF checkpoint and add ``num_layers`` freshly initialised MTP depths (a new shard + index)."""
    src, out = Path(input_dir), Path(output_dir)
    config = load_config(src)
    if int(config.raw.get(NEXTN_KEY) or 0):
        raise UsageError(f"{src} already has MTP layers; convert a checkpoint without them.")
    if num_layers < 1:
        raise UsageError(f"--add-mtp-layers must be >= 1, got {num_layers}.")
    heads = MTPHeads(config, num_layers)
    heads.init_weights(seed)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(config.raw.get("torch_dtype", config.raw.get("dtype"))), torch.float32
    )
    tensors = {
        f"{hf_prefix(config, int(k.split('.')[1]))}{k.split('.', 2)[2]}": v.to(dtype).contiguous()
        for k, v in heads.state_dict().items()
    }
    weight_map = {k: f.name for k, f in _weight_files(src).items()}
    with atomic_dir(out) as tmp:
        for item in src.iterdir():
            if item.is_file() and item.name not in ("config.json", INDEX_NAME):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, str(tmp / "model-mtp.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, "model-mtp.safetensors"))
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        raw = dict(config.raw, **{NEXTN_KEY: num_layers})
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out
