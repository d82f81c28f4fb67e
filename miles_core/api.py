"""The public surface of miles-core for plugins: everything a plugin may use besides the hook specs
(`miles_core.hookspecs`), the data types (`miles_core.types`) and `miles_core.hookimpl`.

A plugin imports only from these four places (a contract test checks it), so the core can move its
modules around freely. Grouped by what a plugin does with them:

- **models** (``configure_model``): the built-in model and its parts, module swapping, the MoE expert
  and routing types, and the MoE dispatch/combine helpers and the SwiGLU backward (`swiglu_backward`)
  a replacement expert module needs;
- **modules in the engine**: a module class that cannot run inside a CUDA graph sets
  ``cuda_graph_safe = False`` (attribute or property); the engine then decodes eagerly;
- **decoding** (``pre_rollout`` returning a decode strategy): the read-only `SequenceView`, the
  `DecodeStrategy` protocol, the sampler's maths, and the static-step and CUDA-graph helpers the engine
  itself uses;
- **weights and files**: HF safetensors I/O, `start_weights` (resume-or-``--hf-checkpoint``),
  `atomic_dir` for checkpoint conversions;
- **generate functions**: `current_context` (the rollout's engine, tokenizer and plugin manager) and
  `generate_into` (run the engine for a sample, recording weight version and sampling parameters);
- **rollout functions** (``--rollout-function-path``): `RolloutDataSource` (what one is given) and
  `generate_rollout` (the built-in rollout, to wrap);
- **tools** (``miles.tools``): `ToolCall`, `parse_tool_calls`, `run_python` (the sandbox);
- **rewards**: `last_boxed`.
"""

from miles_core.atomic import atomic_dir, atomic_write_json, atomic_write_text
from miles_core.engine.cuda_graph import HostCopies, bucket, capture_step, compile_step, model_fingerprint
from miles_core.engine.engine import Engine
from miles_core.engine.sampler import SamplingParams, keyed_exponentials, sample_tokens, tempered_logits
from miles_core.engine.sequence import DecodeStrategy, EngineOutput, SequenceView, filter_flags, graph_safe
from miles_core.model import (
    CausalLM,
    Experts,
    KVCache,
    ModelConfig,
    ModelOutput,
    RMSNorm,
    RoutingState,
    SparseMoeBlock,
    build_model,
    iter_safetensors,
    load_config,
    load_hf_tensors,
    load_model,
    named_hf_tensors,
    save_model,
    set_config_dtype,
    swap_modules,
    weight_files,
    write_hf_checkpoint,
)
from miles_core.model.layers import StepContext, fuse_qkv
from miles_core.model.moe import (
    combine_copies,
    dispatch_copies,
    expert_bounds,
    expert_order,
    expert_row_block,
)
from miles_core.model.swiglu import swiglu_backward
from miles_core.model.transformer import DecoderLayer, cache_context
from miles_core.rollout.boxed import last_boxed
from miles_core.rollout.generate import RolloutContext, current_context, generate_into
from miles_core.rollout.rollout_fn import RolloutDataSource, generate_rollout
from miles_core.rollout.sandbox import run_python
from miles_core.rollout.tools import ToolCall, parse_tool_calls
from miles_core.train.checkpoint import start_weights
from miles_core.train.losses import LossTerms
from miles_core.train.trainer import MicroBatch

__all__ = [
    "CausalLM",
    "DecodeStrategy",
    "DecoderLayer",
    "Engine",
    "EngineOutput",
    "Experts",
    "HostCopies",
    "KVCache",
    "LossTerms",
    "MicroBatch",
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "RolloutContext",
    "RolloutDataSource",
    "RoutingState",
    "SamplingParams",
    "SequenceView",
    "SparseMoeBlock",
    "StepContext",
    "ToolCall",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "bucket",
    "build_model",
    "cache_context",
    "capture_step",
    "combine_copies",
    "compile_step",
    "current_context",
    "dispatch_copies",
    "expert_bounds",
    "expert_order",
    "expert_row_block",
    "filter_flags",
    "fuse_qkv",
    "generate_into",
    "generate_rollout",
    "graph_safe",
    "iter_safetensors",
    "keyed_exponentials",
    "last_boxed",
    "load_config",
    "load_hf_tensors",
    "load_model",
    "model_fingerprint",
    "named_hf_tensors",
    "parse_tool_calls",
    "run_python",
    "sample_tokens",
    "save_model",
    "set_config_dtype",
    "start_weights",
    "swap_modules",
    "swiglu_backward",
    "tempered_logits",
    "weight_files",
    "write_hf_checkpoint",
]
