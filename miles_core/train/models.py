"""The models a trainer starts from: the policy and, for a KL term, the frozen reference model (from
``--ref-load``, else ``--hf-checkpoint``), each loaded in fp32 and configured by the plugins
(``configure_model`` with role ``train`` / ``ref``). Shared by the single-process loop and the trainer
ranks of a scaled-out run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from miles_core.errors import UsageError
from miles_core.model import CausalLM, load_model
from miles_core.train.checkpoint import latest_checkpoint


def ref_weights(args: argparse.Namespace) -> str:
    """The reference model's folder: ``--ref-load`` (an HF folder, or a ``--save`` folder whose newest
    checkpoint's ``model/`` is taken), else ``--hf-checkpoint``."""
    if args.ref_load is None:
        return args.hf_checkpoint
    folder = Path(args.ref_load)
    if (folder / "config.json").is_file():
        return str(folder)
    found = latest_checkpoint(folder) if folder.is_dir() else None
    if found is None:
        raise UsageError(
            f"--ref-load {folder} is neither an HF checkpoint (config.json) nor a --save folder holding a "
            "checkpoint; point it at one of those."
        )
    return str(found / "model")


def load_train_models(
    args: argparse.Namespace, pm: Any, weights: str, device: str | torch.device
) -> tuple[CausalLM, CausalLM | None]:
    """``(policy from weights, reference from --hf-checkpoint or None)`` on ``device``."""
    policy = load_model(weights, dtype=torch.float32, device=device)
    pm.hook.configure_model(args=args, model=policy, role="train")
    ref = None
    if args.use_kl_loss or args.kl_coef:
        ref = load_model(ref_weights(args), dtype=torch.float32, device=device).eval().requires_grad_(False)
        pm.hook.configure_model(args=args, model=ref, role="ref")
    return policy, ref
