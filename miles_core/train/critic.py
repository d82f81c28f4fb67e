"""The value model of PPO (``--advantage-estimator ppo``): a transformer with a scalar value head.

The trunk starts from the policy's checkpoint (``--hf-checkpoint``), or from ``--critic-load``: an HF
checkpoint folder (any architecture miles loads, same tokenizer), or a ``--save`` folder of a PPO run
whose newest checkpoint holds a critic. The head is a ``Linear(hidden, 1)`` initialised to zero, so
every value starts at 0. ``V_t`` is read at the position that predicts response token ``t`` (the state
before the token), the same positions the policy's log-probs use. The critic trains in fp32 with its own
AdamW (``--critic-lr``, default ``--lr``; the policy's schedule flags) on the clipped value loss, one
step per policy step, and its weights, optimizer state and step count travel in the run's checkpoint
(``trainer.pt``, key ``critic``), so a resumed run continues with the same critic.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from miles_core.model import CausalLM, load_model
from miles_core.train.checkpoint import POINTER, checkpoints, latest_checkpoint
from miles_core.train.losses import aggregate
from miles_core.train.optim import lr_at
from miles_core.train.ppo import advantages_and_returns, value_loss
from miles_core.types import TrainBatch, UsageError


class Critic:
    """The value model, its optimizer and the returns of the rollout being trained."""

    def __init__(self, args: argparse.Namespace, trainer: Any, model: CausalLM) -> None:
        self.args, self.trainer, self.model = args, trainer, model
        hidden = model.config.hidden_size
        device = next(model.parameters()).device
        self.head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.model.requires_grad_(True).eval()
        self.lr = args.lr if args.critic_lr is None else args.critic_lr
        self.optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=self.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_eps,
            weight_decay=args.weight_decay,
        )
        self.step = 0
        self._returns: list[torch.Tensor] | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.model.parameters(), *self.head.parameters()]

    @classmethod
    def from_args(cls, args: argparse.Namespace, trainer: Any, device: torch.device) -> Critic:
        """The critic of a run: the trunk of ``--critic-load`` (or the policy checkpoint), see the module."""
        source = args.critic_load
        if source is None:
            return cls(args, trainer, load_model(args.hf_checkpoint, dtype=torch.float32, device=device))
        path = Path(source)
        if (path / POINTER).is_file() or checkpoints(path):
            ckpt = latest_checkpoint(path)
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
            if "critic" not in state:
                raise UsageError(
                    f"--critic-load {source}: its checkpoint {ckpt.name} holds no critic (not a PPO run); "
                    "pass a PPO run's --save folder or an HF checkpoint folder."
                )
            critic = cls(args, trainer, load_model(args.hf_checkpoint, dtype=torch.float32, device=device))
            critic.load_weights(state["critic"]["weights"], f"--critic-load {source}")
            return critic
        if (path / "config.json").is_file():
            return cls(args, trainer, load_model(path, dtype=torch.float32, device=device))
        raise UsageError(
            f"--critic-load {source} is neither an HF checkpoint folder (config.json) nor a --save folder "
            "of checkpoints; point it at one of them."
        )

    # ------------------------------------------------------------------ weights and state

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"value_head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def load_weights(self, weights: dict[str, torch.Tensor], what: str) -> None:
        model = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        head = {k[len("value_head.") :]: v for k, v in weights.items() if k.startswith("value_head.")}
        try:
            self.model.load_state_dict(model)
            self.head.load_state_dict(head)
        except RuntimeError as err:
            raise UsageError(
                f"{what}: its critic does not fit the architecture of --hf-checkpoint "
                f"({str(err).splitlines()[0]}); use a critic saved by a run of the same model."
            ) from err

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_weights(state["weights"], "the checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])

    # ------------------------------------------------------------------ values and training

    def _values(self, mb: Any) -> torch.Tensor:
        """``V`` at the micro-batch's response tokens, float32 ``[N]``."""
        packed = {} if mb.seq_lens is None else dict(position_ids=mb.position_ids, seq_lens=mb.seq_lens)
        out = self.model(mb.input_ids, return_hidden=True, compute_logits=False, **packed)
        return self.head(out.hidden[mb.resp_rows, mb.resp_cols].float()).squeeze(-1)

    @torch.no_grad()
    def prepare(self, batch: TrainBatch) -> dict[str, float]:
        """Set ``batch.values`` (per sample float32 ``[response_length]``, on the CPU) and keep the GAE
        returns the critic trains toward; needs the rollout's rewards (and ref log-probs with
        ``--kl-coef``). Returns metrics of the values against the returns."""
        values: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for mb in self.trainer.micro_batches(batch, list(range(len(batch)))):
            for i, piece in zip(mb.index, self._values(mb).split(mb.lengths)):
                values[i] = piece.float().cpu()
        batch.values = values
        self._returns = advantages_and_returns(self.args, batch)[1]
        mask = torch.cat([m.float() for m in batch.loss_masks])
        v, r = torch.cat(values), torch.cat(self._returns)
        n = mask.sum().clamp(min=1)
        r_mean = (r * mask).sum() / n
        r_var = ((r - r_mean).square() * mask).sum() / n
        resid_var = ((r - v - ((r - v) * mask).sum() / n).square() * mask).sum() / n
        return {
            "critic_values_mean": float((v * mask).sum() / n),
            "critic_returns_mean": float(r_mean),
            "critic_explained_variance": float(1 - resid_var / r_var) if r_var > 0 else 0.0,
        }

    def train_step(self, batch: TrainBatch, idx: list[int]) -> dict[str, float]:
        """One optimizer step of the value loss on samples ``idx`` of the batch `prepare` saw; the loss is
        reduced like the policy loss (per sample, or per token with ``--calculate-per-token-loss``)."""
        args = self.args
        if self._returns is None or batch.values is None:
            raise RuntimeError("Critic.train_step before Critic.prepare on this batch")
        sub = batch.subset(idx)
        returns = [self._returns[i] for i in idx]
        mask_all = torch.cat([m.float() for m in sub.loss_masks])
        denom = float(mask_all.sum().clamp(min=1)) if args.calculate_per_token_loss else float(len(sub))
        lr = lr_at(args, self.lr, self.step, self.trainer.total_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        loss_sum = clip_sum = 0.0
        for mb in self.trainer.micro_batches(sub, list(range(len(sub)))):
            v = self._values(mb)
            old = torch.cat([sub.values[i] for i in mb.index]).to(v.device)
            ret = torch.cat([returns[i] for i in mb.index]).to(v.device)
            per_token, clipped = value_loss(v, old, ret, args.value_clip)
            loss = aggregate(per_token, mb.loss_mask, mb.lengths_t, args.calculate_per_token_loss, denom)
            loss.backward()
            loss_sum += float(loss.detach())
            clip_sum += float(
                aggregate(clipped, mb.loss_mask, mb.lengths_t, args.calculate_per_token_loss, denom)
            )
        max_norm = args.clip_grad if args.clip_grad > 0 else float("inf")
        params = [p for p in self.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.step += 1
        self.model.eval()
        return {
            "value_loss": loss_sum,
            "value_clipfrac": clip_sum,
            "critic_grad_norm": float(grad_norm),
            "critic_lr": lr,
        }
