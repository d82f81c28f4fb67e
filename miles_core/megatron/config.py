"""HF `config.json` (as the built-in `ModelConfig`) and miles' flags -> megatron-core's model settings.

`transformer_config_kwargs` is plain data (no megatron-core needed), so the mapping is tested on its
own; `build_gpt_model` builds the `GPTModel` on the local (non Transformer-Engine) layer spec.
Settings are those that make Megatron compute what the HF model computes: RMSNorm with the config's
eps, SwiGLU, no linear biases except Qwen2's q/k/v, per-head q/k RMSNorm for Qwen3, RoPE (non
interleaved) with the config's theta, and for MoE the softmax top-k router (``norm_topk_prob`` ->
softmax over the chosen k; otherwise softmax over all experts, then top-k) with no load-balancing
loss, since the built-in trainer adds none.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from miles_core.model.config import ModelConfig
from miles_core.types import UsageError

# Megatron's llama3 RoPE scaling has fixed constants; other values would silently change the model.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """`GPTModel` RoPE arguments for the config's rope type."""
    kw: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=cfg.rope_theta, rotary_percent=1.0)
    scaling = cfg.rope_scaling or {}
    if cfg.rope_type == "linear":
        kw["seq_len_interpolation_factor"] = float(scaling["factor"])
    elif cfg.rope_type == "llama3":
        odd = {k: scaling.get(k) for k, v in _LLAMA3_FIXED.items() if scaling.get(k) != v}
        if odd:
            raise UsageError(
                f"--train-backend megatron supports llama3 rope scaling only with {_LLAMA3_FIXED} "
                f"(megatron-core's constants), not {odd}; use --train-backend torch for this model."
            )
        kw.update(rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return kw


def transformer_config_kwargs(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of megatron-core's `TransformerConfig` for this model and run."""
    if cfg.attention_bias or cfg.mlp_bias:
        raise UsageError(
            "--train-backend megatron maps only checkpoints without attention_bias/mlp_bias (Megatron "
            "biases every linear together); use --train-backend torch for this model."
        )
    kw: dict[str, Any] = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size or cfg.moe_intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        params_dtype=torch.float32,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=bool(args.sequence_parallel),
        use_cpu_initialization=True,
    )
    recompute = args.recompute_granularity or ("selective" if args.recompute_activations else None)
    if recompute is not None:
        kw["recompute_granularity"] = recompute
    if recompute == "full":
        kw["recompute_method"] = args.recompute_method
        kw["recompute_num_layers"] = args.recompute_num_layers
    if cfg.is_moe:
        moe = set(cfg.moe_layer_ids)
        kw.update(
            num_moe_experts=cfg.num_experts,
            moe_layer_freq=[int(i in moe) for i in range(cfg.num_hidden_layers)],
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_router_pre_softmax=not cfg.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_token_dispatcher_type="allgather",
            moe_enable_routing_replay=True,  # idle until a forward records or replays routes (R3)
        )
    return kw


def one_process_args() -> argparse.Namespace:
    """The flags `transformer_config_kwargs` reads, for one process without recompute (conversions)."""
    return argparse.Namespace(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        context_parallel_size=1, sequence_parallel=False, recompute_granularity=None,
        recompute_activations=False, recompute_method=None, recompute_num_layers=None,
    )  # fmt: skip


def gpt_model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of `GPTModel` besides the config and layer spec."""
    return dict(
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        **rope_kwargs(cfg),
    )


def build_gpt_model(cfg: ModelConfig, args: argparse.Namespace) -> torch.nn.Module:
    """A megatron-core `GPTModel` (local spec) for ``cfg`` on the CPU, weights left as initialised.
    Needs `parallel_state` initialised (`miles_core.megatron.runtime.init_parallel`)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(**transformer_config_kwargs(cfg, args))
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    return GPTModel(config=config, transformer_layer_spec=spec, **gpt_model_kwargs(cfg))
