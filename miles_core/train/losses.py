"""Per-token RL loss math of the trainer: KL estimators, the clipped PPO / GSPO policy loss, loss
aggregation, log-probs and entropy from logits, and train/rollout mismatch metrics.

Formulas and flag semantics follow slime (`slime/utils/ppo_utils.py`, `megatron_utils/loss.py`) and miles.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from miles_core.devices import to_device
from miles_core.train import logprob_kernel
from miles_core.types import UsageError

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")
# exp() of a log-ratio beyond this overflows float32 into inf and poisons the loss with NaN (miles clamps
# at the same value); a token this far off-policy is clipped anyway.
_LOG_RATIO_CLAMP = 20.0
# Rows of logits upcast to float32 at a time: bounds the transient fp32 copy to ~256 MiB per chunk.
_CHUNK_ELEMENTS = 1 << 26


@dataclass
class LossTerms:
    """Per-token terms of one micro-batch, handed to the ``loss_correction`` hook.

    All tensors are flat float32 ``[num_tokens]`` over the micro-batch's response tokens, samples
    concatenated in order; ``lengths[i]`` is the response length of sample ``i``. A hook may replace
    ``pg_loss`` (e.g. multiply by a detached weight) or zero entries of ``loss_mask``: a zeroed token
    leaves the numerators of the loss terms, while each sample's (or the step's) denominator keeps the
    tokens of the mask as it came in (slime's decoupling of importance weights and rejection).
    """

    log_probs: torch.Tensor  # current policy, carries grad
    old_log_probs: torch.Tensor  # the PPO ratio's old policy (the rollout's with --use-rollout-logprobs)
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    pg_loss: torch.Tensor  # clipped PPO loss per token, before aggregation
    lengths: list[int]
    rollout_log_probs: torch.Tensor | None = None  # what the engine sampled from; None if not recorded
    # The trainer's own log-probs before the update (what TIS compares with the rollout's); None: the
    # same as old_log_probs.
    train_log_probs: torch.Tensor | None = None
    total_lengths: list[int] | None = None  # len(tokens) (prompt + response) of each sample

    @property
    def trainer_log_probs(self) -> torch.Tensor:
        """The trainer's log-probs before the update: ``train_log_probs``, else ``old_log_probs``."""
        return self.old_log_probs if self.train_log_probs is None else self.train_log_probs


def check_loss_args(args: argparse.Namespace) -> None:
    """Reject loss-flag combinations that would silently train wrong; called once after parsing."""
    if args.eps_clip_c is not None and args.eps_clip_c <= 1.0:
        raise UsageError(
            f"--eps-clip-c is {args.eps_clip_c} but dual-clip PPO needs a value > 1; raise it or drop it."
        )
    if args.kl_loss_type not in KL_TYPES:
        raise UsageError(
            f"--kl-loss-type {args.kl_loss_type!r} is unknown; choose one of {', '.join(KL_TYPES)}."
        )
    if args.use_tis and args.tis_clip_low > args.tis_clip:
        raise UsageError("--tis-clip-low is above --tis-clip; set the lower bound below the upper one.")
    if args.use_icepop and args.icepop_low >= args.icepop_high:
        raise UsageError("--icepop-low must be below --icepop-high; fix the IcePop ratio window.")
    if args.use_tis and args.use_icepop:
        raise UsageError("--use-tis and --use-icepop both reweight the same tokens; pass only one of them.")


# ---------------------------------------------------------------------------------------------------------
# KL estimators and the policy loss
# ---------------------------------------------------------------------------------------------------------


def compute_approx_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    kl_type: str,
    importance_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise estimate of KL(policy || ref) from sampled tokens (Schulman's k1/k2/k3).

    With ``log_ratio = log_probs - ref_log_probs``: k1 = log_ratio, k2 = log_ratio**2 / 2,
    k3 = exp(-log_ratio) - 1 + log_ratio (non-negative, unbiased, low variance). ``importance_ratio``
    (``--use-unbiased-kl``: pi / pi_old, with its gradient, as slime) multiplies the estimate, which makes
    it unbiased for tokens sampled from pi_old (DeepSeek-V3.2). ``low_var_kl`` is k3 clamped to
    [-10, 10] for stability, after the weighting, as in slime.
    """
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kl_type == "k1":
        kl = log_ratio
    elif kl_type == "k2":
        kl = log_ratio.square() / 2.0
    elif kl_type in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1.0 + log_ratio
    else:
        raise ValueError(f"unknown KL estimator {kl_type!r}; expected one of {KL_TYPES}")
    if importance_ratio is not None:
        kl = importance_ratio * kl
    return kl.clamp(-10.0, 10.0) if kl_type == "low_var_kl" else kl


def _bounds_and_log_ratio(eps_clip, eps_clip_high, log_probs, old_log_probs, log_ratio):
    """The upper clip (default: the lower one) and the per-token log ratio (given, or new - old), NaN-free
    and clamped, as `policy_loss` and `cispo_loss` read them."""
    if log_ratio is None:
        log_ratio = log_probs.float() - old_log_probs.float()
    log_ratio = torch.nan_to_num(log_ratio, nan=0.0).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (eps_clip if eps_clip_high is None else eps_clip_high), log_ratio


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate per token: ``(pg_loss, clipfrac, ppo_kl)``, all shaped like ``advantages``.

    ``ratio = exp(log_probs - old_log_probs)`` (or ``exp(log_ratio)`` when given, e.g. the GSPO
    sequence ratio from ``gspo_log_ratio``); loss = max(-A*ratio, -A*clip(ratio, 1-eps_clip,
    1+eps_clip_high)). With ``eps_clip_c`` (dual clip, > 1) the loss of tokens with A < 0 is also capped
    at -A*eps_clip_c. ``clipfrac`` is 1.0 where the clipped branch was strictly larger (slime's
    definition); ``ppo_kl = -log_ratio`` (old - new), detached.
    """
    eps_clip_high, log_ratio = _bounds_and_log_ratio(
        eps_clip, eps_clip_high, log_probs, old_log_probs, log_ratio
    )
    ratio = torch.exp(log_ratio)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).float()
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"eps_clip_c must be > 1 for dual-clip PPO, got {eps_clip_c}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * eps_clip_c), loss)
    return loss, clipfrac, (-log_ratio).detach()


def cispo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``(pg_loss, clipfrac, ppo_kl)`` per token.

    loss = -sg(clip(ratio, 1 - eps_clip, 1 + eps_clip_high)) * A * log_probs: the importance ratio is
    clipped under stop-gradient and the gradient flows through ``log_probs``, so clipped tokens still
    learn (PPO drops them). ``clipfrac`` is 1.0 where the clamp changed the ratio; ``ppo_kl`` as in
    `policy_loss`. Canonical CISPO has no lower bound: ``--eps-clip`` >= 1. Dual clip does not apply.
    """
    if eps_clip_c is not None:
        raise ValueError("CISPO has no dual clip; eps_clip_c must be None")
    eps_clip_high, log_ratio = _bounds_and_log_ratio(
        eps_clip, eps_clip_high, log_probs, old_log_probs, log_ratio
    )
    ratio = torch.exp(log_ratio.detach())
    truncated = ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    loss = -truncated * advantages.float() * log_probs.float()
    return loss, (truncated != ratio).float(), (-log_ratio).detach()


def gspo_log_ratio(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    lengths: list[int] | torch.Tensor,
) -> torch.Tensor:
    """GSPO's sequence-level log importance ratio, broadcast to each token of its sample.

    Value: per sample, the masked mean of ``log_probs - old_log_probs``. Gradient: GSPO-token's
    ``sg(seq_log_ratio) + log_probs - sg(log_probs)``, so ``exp`` of it has the sequence ratio as value and
    ``seq_ratio * grad(log_prob)`` per token; with per-sample mean aggregation this equals GSPO's gradient.
    Flat ``[num_tokens]`` in and out; pass the result to ``policy_loss(..., log_ratio=...)``.
    """
    diff = (log_probs.detach().float() - old_log_probs.float()) * loss_mask
    lens = _lengths_tensor(lengths, diff.device)
    means = sample_sums(diff, lens) / sample_sums(loss_mask.float(), lens).clamp(min=1)
    seq_log_ratio = means.repeat_interleave(lens, output_size=diff.numel())
    return seq_log_ratio + (log_probs.float() - log_probs.detach().float())


def _lengths_tensor(lengths: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        return lengths.to(device)
    return to_device(torch.tensor(lengths, dtype=torch.long), device)


def sample_sums(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-sample sums of flat ``values [num_tokens]`` laid out as consecutive runs of ``lengths [B]``
    (a run may be empty): deterministic, differentiable, and no host sync (``torch.segment_reduce``
    reads ``lengths.sum()`` back to check it, which stalled the trainer's GPU queue at every loss
    term). Row b of a ``[B, num_tokens]`` membership mask times the values, summed."""
    n, b = values.numel(), lengths.numel()
    owner = torch.repeat_interleave(torch.arange(b, device=values.device), lengths, output_size=n)
    member = owner[None, :] == torch.arange(b, device=values.device)[:, None]
    return (member * values[None, :]).sum(1)


def aggregate(
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    lengths: list[int] | torch.Tensor,
    per_token: bool,
    denom: float | None = None,
    denom_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-token ``values [num_tokens]`` of a micro-batch to a scalar.

    ``per_token`` (``--calculate-per-token-loss``): sum(values * mask) / denom, denom defaulting to the
    micro-batch's mask sum. Otherwise each sample's masked mean, summed, / denom (default: number of
    samples). The trainer passes the whole optimizer step's token / sample count as ``denom`` so that
    summing the micro-batch losses reproduces the step-level mean exactly. ``denom_mask`` (default
    ``loss_mask``) counts the tokens of the denominators: a correction that rejects tokens zeroes them in
    ``loss_mask`` only, so they leave the sums but not the counts.
    """
    denom_mask = loss_mask if denom_mask is None else denom_mask
    if not isinstance(lengths, torch.Tensor) and sum(lengths) != values.numel():
        raise ValueError(f"lengths sum to {sum(lengths)} but there are {values.numel()} values")
    masked = values * loss_mask
    if per_token:
        d = denom_mask.sum().clamp(min=1) if denom is None else denom
        return masked.sum() / d
    if len(lengths) == 0:
        return masked.sum()
    lens = _lengths_tensor(lengths, values.device)
    means = sample_sums(masked, lens) / sample_sums(denom_mask.to(masked.dtype), lens).clamp(min=1)
    return means.sum() / (len(lengths) if denom is None else denom)


# ---------------------------------------------------------------------------------------------------------
# log-probs and entropy from logits
# ---------------------------------------------------------------------------------------------------------


def _chunk_forward(logits: torch.Tensor, targets: torch.Tensor | None, with_entropy: bool):
    """fp32 (row max, logsumexp of the max-shifted row, target log-prob, entropy) of ``[n, V]`` rows."""
    # Shift by the row max first: with logits ~1e3, sum(p * x) would lose the entropy to fp32 rounding
    # (an ulp of 1e3 times 1e3); the shifted values keep it exact. The shift is out of place: `.float()`
    # of fp32 logits is the logits themselves, which the backward reads again.
    x = logits.float()
    row_max = x.amax(dim=-1)
    x = x - row_max[:, None]
    lse = torch.logsumexp(x, dim=-1)
    logp = x.gather(-1, targets[:, None]).squeeze(-1) - lse if targets is not None else None
    ent = None
    if with_entropy:
        p_x = torch.exp(x - lse[:, None]).mul_(x).nan_to_num_(nan=0.0)  # 0 * -inf -> 0
        ent = lse - p_x.sum(-1)
    return row_max, lse, logp, ent


def _chunk_backward(logits, targets, row_max, lse, ent, grad_logp, grad_ent) -> torch.Tensor:
    """d(sum grad_logp * logp + grad_ent * ent) / d logits for ``[n, V]`` rows, in the logits' dtype."""
    x = logits.float() - row_max[:, None]
    p = torch.exp(x - lse[:, None])
    g = torch.zeros_like(x)
    if grad_logp is not None:
        # d logp_t / dx = onehot(t) - softmax
        gl = grad_logp.float()
        g -= p * gl[:, None]
        g.scatter_add_(-1, targets[:, None], gl[:, None])
    if grad_ent is not None:
        # dH / dx_j = -p_j * (x_j - E_p[x]), with E_p[x] = lse - H in shifted units
        centred = (x - (lse - ent)[:, None]).mul_(p).nan_to_num_(nan=0.0)
        g -= centred * grad_ent.float()[:, None]
    return g.to(logits.dtype)


class _ChunkedLogProbEntropy(torch.autograd.Function):
    """Target log-probs and entropy of ``[N, V]`` logits, upcasting only a chunk of rows at a time.

    Plain autograd would keep an fp32 copy of every chunk alive for backward; here backward recomputes
    each chunk's softmax instead, so peak extra memory is one fp32 chunk and the gradient keeps the
    logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows, with_entropy):
        n = logits.shape[0]
        parts = []
        for s in range(0, n, chunk_rows):
            tgt = None if targets is None else targets[s : s + chunk_rows]
            parts.append(_chunk_forward(logits[s : s + chunk_rows], tgt, with_entropy))
        row_max, lse = torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])
        empty = logits.new_empty(0, dtype=torch.float32)
        logp = torch.cat([q[2] for q in parts]) if targets is not None and parts else empty
        ent = torch.cat([q[3] for q in parts]) if with_entropy and parts else empty
        saved_targets = targets if targets is not None else logits.new_empty(0, dtype=torch.long)
        ctx.save_for_backward(logits, saved_targets, row_max, lse, ent)
        ctx.chunk_rows, ctx.has_targets = chunk_rows, targets is not None
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, row_max, lse, ent = ctx.saved_tensors
        if not ctx.has_targets:
            grad_logp = None
        if not ent.numel():
            grad_ent = None
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk_rows):
            r = slice(s, s + ctx.chunk_rows)
            grad[r] = _chunk_backward(
                logits[r], targets[r] if ctx.has_targets else None, row_max[r], lse[r],
                ent[r] if grad_ent is not None else None,
                None if grad_logp is None else grad_logp[r], None if grad_ent is None else grad_ent[r],
            )  # fmt: skip
        return grad, None, None, None


def _chunk_rows(logits: torch.Tensor, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, logits.shape[-1]))


def log_probs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    with_entropy: bool = True,
    chunk_rows: int | None = None,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets [N]`` under ``logits [N, V]`` and the entropy of each row, both float32
    ``[N]``, in one chunked pass (entropy is ``None`` unless ``with_entropy``). Differentiable.
    ``fused`` (the trainer's ``--train-compile``) uses one Triton kernel each way where it runs
    (`logprob_kernel`), the same maths without fp32 copies of the logits."""
    if fused and logprob_kernel.available(logits):
        logp, ent = logprob_kernel.FusedLogProbEntropy.apply(logits, targets.long(), with_entropy)
        return logp, (ent if with_entropy else None)
    rows = _chunk_rows(logits, chunk_rows)
    logp, ent = _ChunkedLogProbEntropy.apply(logits, targets.long(), rows, with_entropy)
    return logp, (ent if with_entropy else None)


def log_probs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """float32 ``[N]`` log-softmax of ``logits [N, V]`` at ``targets [N]`` (logsumexp + gather, fp32
    chunks of rows so a bf16 ``[N, V]`` tensor is never copied to fp32 whole). Differentiable."""
    return log_probs_and_entropy(logits, targets, with_entropy=False, chunk_rows=chunk_rows)[0]


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """float32 entropy of the softmax over the last dim of ``logits [..., V]``, shape ``[...]``:
    ``H = logsumexp(x) - sum(softmax(x) * x)``, stable for large logits. Differentiable."""
    flat = logits.reshape(-1, logits.shape[-1])
    rows = _chunk_rows(flat, chunk_rows)
    _, ent = _ChunkedLogProbEntropy.apply(flat, None, rows, True)
    return ent.reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------------
# train / rollout mismatch
# ---------------------------------------------------------------------------------------------------------


def mismatch_metrics(
    train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, float]:
    """How far the trainer's log-probs are from the engine's, over masked tokens (token-weighted).

    ``train_rollout_logprob_abs_diff``: mean |train - rollout|. ``train_rollout_kl``: mean k3 estimate of
    KL(rollout || train) from the rollout's samples, i.e. with ``r = p_train / p_rollout``,
    ``r - 1 - log r`` per token, clamped to [-10, 10] -- miles' definition
    (``compute_approx_kl(rollout, train, "low_var_kl")``). Both are 0 only where the two sides compute
    bitwise-equal log-probs.
    """
    train = train_log_probs.detach().float()
    rollout = rollout_log_probs.detach().float()
    mask = loss_mask.float()
    n = mask.sum().clamp(min=1)
    abs_diff = ((train - rollout).abs() * mask).sum() / n
    kl = (compute_approx_kl(rollout, train, "low_var_kl") * mask).sum() / n
    return {"train_rollout_logprob_abs_diff": abs_diff.item(), "train_rollout_kl": kl.item()}
