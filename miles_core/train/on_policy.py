"""``--true-on-policy-mode``: the core's ``configure_model`` hookimpl that switches every model the run
builds (policy, reference, rollout engine) to the batch-invariant ops of `miles_core.model.batch_invariant`,
and the check of the flags the mode cannot honour.

With the ops on both sides, each response token's log-prob that the engine sampled from (prefill, then
decode steps of any batch: eager on CPU, CUDA graphs on GPU) equals bitwise the one the trainer
recomputes (padded or packed micro-batches of any size, activation recompute on or off), for dense and MoE
models, on CPU in fp32 and on CUDA (Triton kernels, `miles_core.model.invariant_kernels`) in fp32 and
bf16: the logged ``train/train_rollout_logprob_abs_diff`` and ``train/train_rollout_kl`` are exactly 0.
"""

from __future__ import annotations

import argparse

import torch

from miles_core.errors import UsageError
from miles_core.model import invariant_kernels, make_batch_invariant
from miles_core.plugins import hookimpl

# Flags whose kernels reduce in another order than the batch-invariant ops, refused in the mode:
# torch.compile (inductor fuses elementwise chains, computes them in fp32 and rounds once, where eager
# rounds after each op) and the decode-only Triton expert kernels.
_REFUSED = (
    ("train_compile", "--train-compile"),
    ("rollout_compile", "--rollout-compile"),
    ("rollout_fused_moe", "--rollout-fused-moe"),
)


def check_true_on_policy(args: argparse.Namespace) -> None:
    """Refuse flags that would break the mode's bitwise guarantee, in one sentence each."""
    if not args.true_on_policy_mode:
        return
    for dest, flag in _REFUSED:
        if vars(args)[dest]:
            raise UsageError(
                f"{flag} runs kernels that are not batch-invariant, so --true-on-policy-mode could not "
                f"keep rollout and training log-probs equal; drop {flag} or the mode."
            )
    if args.rollout_backend != "torch":
        raise UsageError(
            f"--true-on-policy-mode needs the built-in engine's batch-invariant ops in the rollout, which "
            f"--rollout-backend {args.rollout_backend} does not run; use --rollout-backend torch."
        )


@hookimpl
def configure_model(args: argparse.Namespace, model: torch.nn.Module, role: str) -> None:
    """In the mode, switch the model to the batch-invariant ops (every role: train, ref, rollout)."""
    if not args.true_on_policy_mode:
        return
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype != torch.float32:
        raise UsageError(
            f"--true-on-policy-mode on CPU is bitwise in fp32 only, but the {role} model is "
            f"{str(param.dtype).removeprefix('torch.')}; drop --bf16."
        )
    if param.device.type == "cuda" and invariant_kernels.triton is None:
        raise UsageError(
            "--true-on-policy-mode on CUDA runs its batch-invariant Triton kernels, but triton is not "
            "installed; pip install triton."
        )
    make_batch_invariant(model)
