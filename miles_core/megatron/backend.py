"""``--train-backend megatron``: the built-in trainer's losses, advantages and hooks on a megatron-core
`GPTModel`.

`MegatronTrainer` is the built-in `Trainer` with its models swapped: the policy (and reference) loaded
by the loop are converted into `GPTModel`s (`weights.hf_to_megatron`), wrapped in `MegatronCausalLM`,
whose forward returns the ``[B, T, V]`` logits the trainer reads at response positions. Log-probs,
the policy loss, `loss_correction`, `pre_forward`/`post_step`, the optimizer and checkpoints are the
built-in trainer's; R3 goes through megatron-core's router replay. Weights leave as HF tensors
(`weights.megatron_to_hf`) for the engine and `save_model`. One process holds the whole model: sizes
above 1 are refused by `miles_core.args_megatron.check_parallel_args` until trainer ranks can be launched.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from typing import Any

import torch

from miles_core.args_megatron import check_megatron_args
from miles_core.megatron import require
from miles_core.megatron.config import build_gpt_model
from miles_core.megatron.runtime import init_parallel
from miles_core.megatron.weights import hf_to_megatron, megatron_to_hf
from miles_core.model import (
    CausalLM,
    ModelConfig,
    RoutingState,
    named_hf_tensors,
    set_config_dtype,
    write_hf_checkpoint,
)
from miles_core.model.transformer import ModelOutput
from miles_core.train.trainer import Trainer
from miles_core.types import UsageError


def attention_mask(input_ids: torch.Tensor, seq_lens: list[int] | None = None) -> torch.Tensor:
    """Megatron's boolean mask (True = hidden) ``[1, 1, T, T]``: causal, and with ``seq_lens`` (a packed
    row) also block-diagonal, so no sample attends to another."""
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device)
    hidden = pos[None, :] > pos[:, None]
    if seq_lens is not None:
        seg = torch.repeat_interleave(
            torch.arange(len(seq_lens), device=input_ids.device),
            torch.tensor(seq_lens, device=input_ids.device),
        )
        hidden = hidden | (seg[None, :] != seg[:, None])
    return hidden[None, None]


class MegatronCausalLM(torch.nn.Module):
    """A `GPTModel` behind the call the trainer makes on a model: ``(input_ids [B, T] int64) ->
    ModelOutput(logits [B, T, V])``. ``model`` is the `GPTModel`; ``config`` the HF `ModelConfig`."""

    def __init__(self, config: ModelConfig, gpt: torch.nn.Module) -> None:
        super().__init__()
        self.config, self.model = config, gpt

    @classmethod
    def from_hf_tensors(
        cls, config: ModelConfig, tensors: dict[str, torch.Tensor], args: argparse.Namespace
    ) -> MegatronCausalLM:
        """Build the `GPTModel` for ``config`` and load HF-named ``tensors`` into it (one rank)."""
        gpt = build_gpt_model(config, args)
        state = hf_to_megatron(config, tensors)[0][0]
        missing, unexpected = gpt.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise UsageError(
                f"the checkpoint does not fill the Megatron model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); report this with its config.json."
            )
        return cls(config, gpt)

    def megatron_state(self) -> dict[str, torch.Tensor]:
        """The `GPTModel`'s tensors by Megatron name (no Transformer-Engine extra state)."""
        return {k: v for k, v in self.model.state_dict().items() if not k.endswith("_extra_state")}

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The weights as HF-named tensors."""
        return megatron_to_hf(self.config, [[self.megatron_state()]])

    def forward(
        self,
        input_ids: torch.Tensor,
        routing: Any = None,
        return_hidden: bool = False,
        position_ids: torch.Tensor | None = None,
        seq_lens: list[int] | None = None,
    ) -> ModelOutput:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        mask = attention_mask(input_ids, seq_lens)
        if routing is None:
            return ModelOutput(logits=self.model(input_ids, position_ids, attention_mask=mask))
        return ModelOutput(logits=self._routed(input_ids, position_ids, mask, routing))

    def _routed(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, routing: RoutingState
    ) -> torch.Tensor:
        """Forward through megatron-core's router replay: each MoE layer's own top-k is recorded in
        ``routing.router_topk`` ([B, T, k] per layer) and, with ``routing.replay``, the layer routes to
        exactly those experts, gate weights taken from the current router's scores there (R3)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        if self.model.config.recompute_granularity is not None and routing.replay is not None:
            raise UsageError(
                "--train-backend megatron replays MoE routes only without activation recompute; drop "
                "--recompute-granularity/--recompute-activations or routing replay."
            )
        routers = [m for m in self.model.modules() if getattr(m, "router_replay", None) is not None]
        b, t = input_ids.shape
        own: list[torch.Tensor] = []

        def record(router: torch.nn.Module, inputs: tuple) -> None:  # Megatron's tokens run [T, B]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            top = torch.nn.functional.linear(x, router.weight.to(x.dtype)).topk(router.topk, dim=-1).indices
            own.append(top.reshape(t, b, -1).transpose(0, 1))

        handles = [r.register_forward_pre_hook(record) for r in routers]
        try:
            if routing.replay is not None:
                for router, chosen in zip(routers, routing.replay, strict=True):
                    flat = chosen.transpose(0, 1).reshape(t * b, -1).long().to(input_ids.device)
                    router.router_replay.set_target_indices(flat)
                    router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            logits = self.model(input_ids, position_ids, attention_mask=mask)
        finally:
            for handle in handles:
                handle.remove()
            for router in routers:
                router.router_replay.clear_router_replay_action()
                router.router_replay.clear_indices()
        routing.router_topk = own
        routing.used_topk = [r.long() for r in routing.replay] if routing.replay is not None else own
        return logits


class MegatronTrainer(Trainer):
    """The built-in trainer on megatron-core models (see the module)."""

    def __init__(
        self, args: argparse.Namespace, pm: Any, model: CausalLM, ref_model: CausalLM | None = None
    ) -> None:
        require()
        check_megatron_args(args)
        device = next(model.parameters()).device
        if device.type == "cpu" and torch.cuda.is_available():
            raise UsageError(
                "megatron-core computes on CUDA wherever CUDA exists (its router and RoPE move to the GPU), "
                "so --train-backend megatron cannot train on the CPU here; drop --device cpu."
            )
        init_parallel(seed=args.seed)
        policy = self._convert(model, args).to(device)
        ref = None if ref_model is None else self._convert(ref_model, args).to(device).eval()
        if ref is not None:
            ref.requires_grad_(False)
        super().__init__(args, pm, policy, ref)

    @staticmethod
    def _convert(model: CausalLM, args: argparse.Namespace) -> MegatronCausalLM:
        # A plugin's configure_model may have swapped modules (quantized linears, draft heads); only the
        # HF weights are carried over, so such a model is refused rather than silently trained without.
        foreign = sorted({type(m).__module__ for m in model.modules()} - {""})
        foreign = [name for name in foreign if name.partition(".")[0] not in ("miles_core", "torch")]
        if foreign:
            raise UsageError(
                f"a plugin replaced modules of the model ({foreign[0]}) in configure_model, which "
                "--train-backend megatron does not carry over; turn that plugin's flags off or use "
                "--train-backend torch."
            )
        tensors = {n: t.detach().float().cpu() for n, t in named_hf_tensors(model)}
        return MegatronCausalLM.from_hf_tensors(model.config, tensors, args)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's weights as ``(HF name, tensor)`` pairs, for the rollout engine."""
        yield from self.model.hf_tensors().items()

    def save_model(self, path: str | os.PathLike, tokenizer_src: str | None = None) -> None:
        """Write the policy as an HF checkpoint folder."""
        tensors = self.model.hf_tensors()
        dtype = next(iter(tensors.values())).dtype
        config = self.model.config.to_hf()
        set_config_dtype(config, dtype)
        write_hf_checkpoint(tensors, config, path, tokenizer_src, dtype=dtype)
