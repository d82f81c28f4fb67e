"""Online MTP training: the MTP loss on rollout tokens, added through the ``auxiliary_loss`` hook.

The policy's hidden states, embedding and LM head enter the loss detached, so the policy's gradients are
bitwise those without MTP training. The MTP gradients are also kept out of the policy's gradient-norm
clipping: they are parked after each backward and handed back just before the optimizer steps.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from miles_core.api import CausalLM
from miles_specrl.mtp import MTPHeads, embed, head_logits, step_context


def full_sequences(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild each row's whole token sequence and its response loss mask from a trainer `MicroBatch`.

    :returns: ``(ids int64 [B, T+1], mask float32 [B, T+1])``: ``mask[b, j]`` is the loss mask of token
        ``j`` when it is a response token, else 0.
    """
    b, t = inputs.input_ids.shape
    ids = torch.zeros(b, t + 1, dtype=torch.long, device=inputs.input_ids.device)
    ids[:, :t] = inputs.input_ids
    mask = torch.zeros(b, t + 1, dtype=torch.float32, device=ids.device)
    # A response token predicted at input column c sits at sequence position c + 1.
    ids[inputs.resp_rows, inputs.resp_cols + 1] = inputs.targets
    mask[inputs.resp_rows, inputs.resp_cols + 1] = inputs.loss_mask.float()
    return ids, mask


def mtp_losses(
    model: CausalLM,
    heads: MTPHeads,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    chain: list[nn.Module] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per depth d (1-based): (summed CE, number of correct argmax predictions, token count).

    Depth d at position i reads its input hidden state (the policy's for d = 1, else depth d-1's output)
    and the embedding of token i+d, and predicts token i+d+1 (DeepSeek-V3's sequential MTP).
    ``chain`` replaces ``heads.layers`` as the depths: ``[heads.layers[0]] * k`` trains depth 1 the way
    the EAGLE drafter uses it, fed its own output state for k - 1 more tokens.

    :param hidden: [B, T, H] the policy's final hidden states (detached here).
    :param ids: int64 [B, T+1] whole sequences; ``mask`` float32 [B, T+1] weights of target tokens.
    """
    b, t, _ = hidden.shape
    h = hidden.detach()
    pos = torch.arange(t, device=ids.device).expand(b, t)
    ctx = step_context(model, pos, h.dtype)
    out = []
    for d, layer in enumerate(heads.layers if chain is None else chain, start=1):
        if d + 1 > t:
            break
        # Token i+d for i in [0, t); past the end of the row the values are padding and masked out.
        nxt = torch.zeros(b, t, dtype=torch.long, device=ids.device)
        nxt[:, : t + 1 - d] = ids[:, d:]
        tgt = torch.zeros_like(nxt)
        w = torch.zeros(b, t, device=ids.device)
        tgt[:, : t - d] = ids[:, d + 1 :]
        w[:, : t - d] = mask[:, d + 1 :]
        h, normed = layer(h, embed(model, nxt).to(h.dtype), ctx)
        logits = head_logits(model, normed).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        correct = (logits.argmax(-1) == tgt).float()
        out.append(((ce * w.reshape(-1)).sum(), (correct * w).sum().detach(), w.sum()))
    return out


class MTPTrainer:
    """Per-run state of online MTP training: the step's token counts and the parked MTP gradients."""

    def __init__(self, scale: float, clip: float, chain: int = 0) -> None:
        self.scale, self.clip = scale, clip
        self.chain = chain  # > 0: train depth 1 chained this many times (--mtp-train-chain)
        self.step_counts: list[float] | None = None  # per depth, target tokens of the current step
        self.parked: dict[nn.Parameter, torch.Tensor] = {}
        self.last_grad_norm = 0.0
        self._handles: list[Any] = []

    def install(self, heads: MTPHeads) -> None:
        """Park MTP gradients after each backward so the trainer's clip_grad_norm_ sees only the policy's,
        and restore (and clip separately) them when any optimizer steps."""
        for p in heads.parameters():
            self._handles.append(p.register_post_accumulate_grad_hook(self._park))
        me = weakref.ref(self)

        def restore(optimizer: Any, args: Any, kwargs: Any) -> None:
            obj = me()
            if obj is not None:
                obj.restore()

        self._handles.append(register_optimizer_step_pre_hook(restore))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _park(self, p: nn.Parameter) -> None:
        prev = self.parked.get(p)
        self.parked[p] = p.grad if prev is None else prev + p.grad
        p.grad = None

    def restore(self) -> None:
        if not self.parked:
            return
        grads = list(self.parked.values())
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        factor = min(1.0, self.clip / (float(norm) + 1e-6)) if self.clip > 0 else 1.0
        for p, g in self.parked.items():
            p.grad = g * factor if factor < 1.0 else g
        self.last_grad_norm = float(norm)
        self.parked = {}

    def count_step(self, batch: Any, num_depths: int) -> None:
        """Target-token count per depth over one optimizer step (the loss denominators), from pre_forward."""
        num_depths = self.chain or num_depths
        counts = [0.0] * num_depths
        for s, m in zip(batch.samples, batch.loss_masks):
            p = s.prompt_length
            m = m.float()
            for d in range(1, num_depths + 1):
                first = max(0, d + 1 - p)  # response token k sits at position p + k; depth d needs >= d+1
                counts[d - 1] += float(m[first:].sum())
        self.step_counts = counts

    def loss(self, model: CausalLM, inputs: Any, outputs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        heads: MTPHeads = model.mtp
        ids, mask = full_sequences(inputs)
        chain = [heads.layers[0]] * self.chain if self.chain else None
        parts = mtp_losses(model, heads, outputs.hidden, ids, mask, chain)
        counts = self.step_counts or [float(c.item()) for _, _, c in parts]
        total = outputs.hidden.new_zeros((), dtype=torch.float32)
        metrics: dict[str, float] = {}
        mean_ce = 0.0
        for d, ((ce, correct, _), n) in enumerate(zip(parts, counts), start=1):
            # Sums over this micro-batch divided by the whole step's count: the trainer sums micro-batches.
            depth_loss = ce / max(n, 1.0)
            total = total + depth_loss / len(parts)
            mean_ce += depth_loss.item() / len(parts)
            metrics[f"mtp_acc_{d}"] = correct.item() / max(n, 1.0)
        metrics["mtp_loss"] = mean_ce
        return self.scale * total, metrics
