"""On-policy distillation (``--use-opd --opd-type megatron``, slime's OPD): a frozen teacher checkpoint
scores the student's own samples, and each token's advantage gains ``opd_kl_coef * (log p_teacher -
log p_student)``, the negative per-token reverse-KL estimate (Thinking Machines' on-policy distillation,
slime's ``apply_opd_kl_to_advantages``). With zero task rewards, GRPO's advantages are zero and the
policy gradient pulls the student's log-probs toward the teacher's on the tokens it samples.

The teacher is loaded like the reference model (fp32, ``configure_model`` role ``ref``) and must share
the student's tokenizer (same vocabulary size is checked). Its forward runs without ``pre_forward``:
route replay and recording are the policy's, not a different model's.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from miles_core.model import CausalLM, load_model
from miles_core.types import TrainBatch, UsageError


def load_teacher(args: argparse.Namespace, pm: Any, device: torch.device, student: CausalLM) -> CausalLM:
    """The frozen teacher of ``--opd-teacher-load`` on ``device`` (bf16 with ``--bf16``)."""
    teacher = load_model(args.opd_teacher_load, dtype=torch.float32, device=device)
    teacher.eval().requires_grad_(False)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise UsageError(
            f"--opd-teacher-load {args.opd_teacher_load} has a vocabulary of {teacher.config.vocab_size} "
            f"tokens but the student has {student.config.vocab_size}; distill from a teacher with the "
            "student's tokenizer."
        )
    pm.hook.configure_model(args=args, model=teacher, role="ref")
    if args.bf16:
        teacher.to(torch.bfloat16)
    return teacher


@torch.no_grad()
def teacher_log_probs(trainer: Any, batch: TrainBatch) -> list[torch.Tensor]:
    """Per-sample float32 log-probs ``[response_length]`` of the sampled tokens under ``trainer.teacher``
    (at each sample's rollout temperature, like the student's)."""
    saved = batch.replay_routes, batch.record_routes
    batch.replay_routes, batch.record_routes = None, False
    out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
    try:
        for mb in trainer.micro_batches(batch, list(range(len(batch)))):
            logp, _, _, _ = trainer.forward(trainer.teacher, mb, with_entropy=False)
            for i, piece in zip(mb.index, logp.split(mb.lengths)):
                out[i] = piece.float().cpu()
    finally:
        batch.replay_routes, batch.record_routes = saved
    return out


def opd_advantages(
    advantages: list[torch.Tensor],
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    loss_masks: list[torch.Tensor],
    coef: float,
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """``advantages - coef * (student - teacher)`` per token, and ``opd_reverse_kl``: the mean over
    samples of each sample's masked mean of ``student - teacher`` (>= 0 in expectation)."""
    out, kls = [], []
    for adv, s, t, m in zip(advantages, student, teacher, loss_masks, strict=True):
        reverse_kl = s.float().to(adv.device) - t.float().to(adv.device)
        out.append(adv - coef * reverse_kl)
        m = m.float().to(adv.device)
        kls.append(float((reverse_kl * m).sum() / m.sum().clamp(min=1)))
    return out, {"opd_reverse_kl": sum(kls) / max(len(kls), 1)}
