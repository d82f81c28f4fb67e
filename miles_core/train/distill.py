"""On-policy distillation (``--use-opd``, slime's OPD): a teacher scores the student's own samples, and
each token's advantage gains ``opd_kl_coef * (log p_teacher - log p_student)``, the negative per-token
reverse-KL estimate (Thinking Machines' on-policy distillation, slime's ``apply_opd_kl_to_advantages``).
With zero task rewards, GRPO's advantages are zero and the policy gradient pulls the student's
log-probs toward the teacher's on the tokens it samples.

The teacher is a checkpoint the trainer runs (``--opd-type megatron``) or an SGLang-compatible server
(``--opd-type sglang``, ``--opd-teacher-urls``) asked as slime asks it: ``POST /generate`` with the
sample's tokens, ``max_new_tokens`` 0, ``return_logprob`` and ``logprob_start_len`` 0, reading
``meta_info.input_token_logprobs`` (SGLang and ``miles serve`` answer it).

The teacher is loaded like the reference model (fp32, ``configure_model`` role ``ref``) and must share
the student's tokenizer (same vocabulary size is checked). Its forward runs without ``pre_forward``:
route replay and recording are the policy's, not a different model's.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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


def _ask_server(url: str, sample: Any, timeout: float = 120.0) -> torch.Tensor:
    temperature = float(sample.sampling_params.get("temperature", 1.0)) or 1.0
    body = {
        "input_ids": list(sample.tokens),
        "sampling_params": {"temperature": temperature, "max_new_tokens": 0, "skip_special_tokens": False},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = json.loads(resp.read())
        pairs = answer["meta_info"]["input_token_logprobs"]
        values = [float(p[0]) for p in pairs[1:]]  # the first token has no log-prob (None)
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise UsageError(
            f"the OPD teacher at {url} did not answer input_token_logprobs ({type(err).__name__}: {err}); "
            "check --opd-teacher-urls points at a running SGLang-compatible /generate."
        ) from err
    r = sample.response_length
    if len(values) < r:
        raise UsageError(f"the OPD teacher at {url} sent {len(values)} log-probs for {r} response tokens.")
    return torch.tensor(values[len(values) - r :], dtype=torch.float32)


def server_teacher_log_probs(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
    """Per-sample teacher log-probs ``[response_length]`` from ``--opd-teacher-urls`` (each sample's
    teacher named by its metadata's ``--opd-teacher-key``, else ``default``), 16 requests at a time."""
    urls = args.opd_teacher_urls

    def url_of(sample: Any) -> str:
        name = sample.metadata.get(args.opd_teacher_key)
        if name in urls:
            return urls[name]
        if "default" not in urls:
            raise UsageError(
                f"sample {sample.index} names teacher {name!r}, which --opd-teacher-urls lacks, and there is "
                "no default; add NAME=URL or a bare default URL."
            )
        return urls["default"]

    targets = [url_of(s) for s in batch.samples]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(_ask_server, targets, batch.samples))


def apply_opd(trainer: Any, batch: TrainBatch) -> dict[str, float]:
    """Add the OPD term to ``batch.advantages`` (the teacher's log-probs from ``trainer.teacher`` or the
    servers); the student's are the old policy's (the rollout's with ``--use-rollout-logprobs``)."""
    args = trainer.args
    if trainer.teacher is not None:
        teacher = teacher_log_probs(trainer, batch)
    else:
        teacher = server_teacher_log_probs(args, batch)
    student = batch.rollout_log_probs if args.use_rollout_logprobs else batch.old_log_probs
    batch.advantages, metrics = opd_advantages(
        batch.advantages, student, teacher, batch.loss_masks, args.opd_kl_coef
    )
    return metrics


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
