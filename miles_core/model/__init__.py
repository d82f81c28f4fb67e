"""The built-in decoder-only transformer (dense and MoE; Qwen3-MoE, Qwen3, Qwen2, Llama) and its HF I/O.

The engine and the trainer use only the names re-exported here.
"""

from miles_core.model.batch_invariant import make_batch_invariant, token_log_probs
from miles_core.model.config import ARCH_TRAITS, ModelConfig
from miles_core.model.hf_io import (
    iter_safetensors,
    load_config,
    load_hf_tensors,
    load_model,
    named_hf_tensors,
    save_model,
    set_config_dtype,
    weight_files,
    write_hf_checkpoint,
)
from miles_core.model.kv_cache import KVCache
from miles_core.model.layers import MLP, Attention, RMSNorm
from miles_core.model.moe import Experts, RoutingState, SparseMoeBlock, set_fused_moe
from miles_core.model.transformer import MODEL_CLASSES, CausalLM, ModelOutput, build_model, swap_modules

__all__ = [
    "ARCH_TRAITS",
    "MLP",
    "MODEL_CLASSES",
    "Attention",
    "CausalLM",
    "Experts",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "RoutingState",
    "SparseMoeBlock",
    "set_fused_moe",
    "build_model",
    "iter_safetensors",
    "make_batch_invariant",
    "token_log_probs",
    "load_config",
    "load_hf_tensors",
    "load_model",
    "named_hf_tensors",
    "save_model",
    "set_config_dtype",
    "swap_modules",
    "weight_files",
    "write_hf_checkpoint",
]
