"""The models a trainer starts from: the policy and, for a KL term, the frozen reference model, each
loaded in fp32 and configured by the plugins (``configure_model`` with role ``train`` / ``ref``). Shared
by the single-process loop and the trainer ranks of a scaled-out run."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from miles_core.model import CausalLM, load_model


def load_train_models(
    args: argparse.Namespace, pm: Any, weights: str, device: str | torch.device
) -> tuple[CausalLM, CausalLM | None]:
    """``(policy from weights, reference from --hf-checkpoint or None)`` on ``device``."""
    policy = load_model(weights, dtype=torch.float32, device=device)
    pm.hook.configure_model(args=args, model=policy, role="train")
    ref = None
    if args.use_kl_loss or args.kl_coef:
        ref = load_model(args.hf_checkpoint, dtype=torch.float32, device=device).eval().requires_grad_(False)
        pm.hook.configure_model(args=args, model=ref, role="ref")
    return policy, ref
