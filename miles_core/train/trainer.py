"""The built-in train backend (``torch``): log-probs, PPO/GRPO policy loss, AdamW steps.

One `train` call consumes one rollout: the "old" (and "ref") log-probs are computed for the whole
batch, advantages come from the `advantage` hook, then the batch is split into
``num_steps_per_rollout`` optimizer steps of ``global_batch_size`` samples, each accumulated over
micro-batches of ``micro_batch_size`` right-padded samples, or, with ``--use-dynamic-batch-size``,
of samples packed unpadded into one row of at most ``--max-tokens-per-gpu`` tokens. Loss denominators
are those of the whole step, so the accumulated gradient equals the gradient of the step-level loss
whatever the micro-batch layout. Logits are projected only at response positions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from miles_core import drivers
from miles_core.devices import to_device_many
from miles_core.model import CausalLM, RoutingState, named_hf_tensors, save_model, token_log_probs
from miles_core.train import distill
from miles_core.train.critic import Critic
from miles_core.train.losses import entropy_from_logits, log_probs_and_entropy, mismatch_metrics
from miles_core.train.objective import Objective
from miles_core.train.optim import MasterAdamW, cast_weights, lr_at
from miles_core.train.packing import pack_by_tokens
from miles_core.types import TrainBatch, UsageError


@dataclass
class MicroBatch:
    """A slice of a batch as fed to the model: right-padded rows, or one packed row.

    Padded: ``input_ids`` is ``[B, T]``. Packed (``--use-dynamic-batch-size``): ``input_ids`` is
    ``[1, sum(seq_lens)]`` with the samples back to back, ``position_ids`` restarting at 0 for each and
    ``seq_lens`` their input lengths. Response-token fields are laid out the same way in both.
    """

    index: list[int]  # positions of its samples in the batch
    input_ids: torch.Tensor  # int64 [B, T]: tokens[:-1] of each sample, right-padded (or [1, total])
    resp_rows: torch.Tensor  # int64 [N]: batch row of each response token
    resp_cols: torch.Tensor  # int64 [N]: input position that predicts it
    targets: torch.Tensor  # int64 [N]: the response token ids
    lengths: list[int]  # response length per sample
    lengths_t: torch.Tensor  # the same, int64 on the device (for segmented per-sample reductions)
    loss_mask: torch.Tensor  # float32 [N]
    replay: list[torch.Tensor] | None = None  # per MoE layer int64 [B, T, k]
    seq_lens: list[int] | None = None  # packed: input length (len(tokens) - 1) per sample
    position_ids: torch.Tensor | None = None  # packed: int64 [1, total]
    offsets: list[int] | None = None  # packed: start of each sample in the row
    # The batch's per-token fields for these samples (float32 [N]), when the batch has them.
    old_log_probs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    rollout_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    temperature: torch.Tensor | None = None  # float32 [N]: the rollout's temperature, where not 1
    # A repeat of a real micro-batch that only keeps data-parallel ranks in step (FSDP needs every rank
    # to run as many forwards and backwards): it adds no gradient, metric or log-prob.
    filler: bool = False


def _cat(xs: list[torch.Tensor] | None, idx: list[int]) -> torch.Tensor | None:
    return None if xs is None else torch.cat([xs[i].float() for i in idx])


class Trainer:
    """Owns the policy, the optional reference model and the optimizer.

    Without ``--bf16`` the policy trains in its own dtype (fp32) with `torch.optim.AdamW`. With it, the
    policy's weights become bf16 and the fp32 masters live in the optimizer (`MasterAdamW`): forward
    and backward run in bf16 throughout, gradients add up in fp32. The reference model is cast to bf16.
    """

    def __init__(self, args: argparse.Namespace, pm: Any, model: CausalLM, ref_model: CausalLM | None = None):
        self.args, self.pm, self.model, self.ref_model = args, pm, model, ref_model
        self.device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        adam = dict(lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=args.weight_decay)  # fmt: skip  # noqa: E501
        self.optimizer = self._make_optimizer(params, adam)
        self.max_tokens = args.max_tokens_per_gpu
        if args.use_dynamic_batch_size and not self.max_tokens:
            raise UsageError(
                "--use-dynamic-batch-size packs micro-batches by tokens; also pass --max-tokens-per-gpu N."
            )
        recompute = args.recompute_granularity
        if recompute is None and args.recompute_activations:
            recompute = "selective"
        if hasattr(model.model, "recompute"):
            model.model.recompute = recompute
        for m in (model, ref_model):
            if m is not None:
                m.packed_attention = args.packed_attention
        # --train-compile on CUDA also computes the response log-probs/entropies with the Triton kernels.
        self.fused_loss = args.train_compile and self.device.type == "cuda"
        if args.train_compile:
            # One compiled graph serves every layer (parameters are graph inputs); shapes are dynamic so
            # a new packing length does not recompile.
            for layer in model.model.layers:
                layer.compile(dynamic=True)
        self.step = 0
        self.total_steps = max(1, (args.num_rollout or 1) * (args.num_steps_per_rollout or 1))
        # The estimator may replace the per-token policy ratio (GSPO's sequence-level one).
        self.estimator = drivers.get_estimator(args.advantage_estimator)
        self.objective = Objective(args, pm, self.estimator)
        megatron_opd = args.use_opd and args.opd_type == "megatron"
        self.teacher = distill.load_teacher(args, pm, self.device, model) if megatron_opd else None
        needs_critic = getattr(self.estimator, "needs_critic", False)  # PPO: a value model beside the policy
        self.critic = Critic.from_args(args, self, self.device) if needs_critic else None

    def _make_optimizer(self, params: list[torch.nn.Parameter], adam: dict) -> torch.optim.Optimizer:
        """AdamW over `params`; with --bf16, `MasterAdamW` and the models cast to bf16."""
        if self.args.bf16:
            optimizer = MasterAdamW(params, dtype=torch.bfloat16, **adam)
            cast_weights(self.model, torch.bfloat16)  # the frozen ones; MasterAdamW cast the rest
            if self.ref_model is not None:
                cast_weights(self.ref_model, torch.bfloat16)
            return optimizer
        # fused: one kernel per step instead of a foreach chain
        return torch.optim.AdamW(params, fused=self.device.type == "cuda", **adam)

    # ------------------------------------------------------------------ batching and forward

    def _my_samples(self, batch: TrainBatch) -> list[int]:
        """Positions of the samples of `batch` this process runs (a data-parallel rank: its share)."""
        return list(range(len(batch)))

    def _micro_batch_groups(self, batch: TrainBatch, idx: list[int]) -> list[list[int]]:
        """The samples of each micro-batch over samples `idx`."""
        if self.args.use_dynamic_batch_size:
            bins = pack_by_tokens([batch.tokens[i].shape[0] - 1 for i in idx], self.max_tokens)
            return [[idx[j] for j in group] for group in bins]
        mbs = self.args.micro_batch_size
        return [idx[start : start + mbs] for start in range(0, len(idx), mbs)]

    def micro_batches(self, batch: TrainBatch, idx: list[int]) -> Iterator[MicroBatch]:
        make = self._make_packed_micro_batch if self.args.use_dynamic_batch_size else self._make_micro_batch
        for group in self._micro_batch_groups(batch, idx):
            yield make(batch, group)

    # Per-sample tensors of the batch that the loss reads, moved with each micro-batch's inputs.
    PER_TOKEN = ("old_log_probs", "advantages", "rollout_log_probs", "ref_log_probs")

    def _response_fields(
        self, batch: TrainBatch, index: list[int], lengths: list[int], starts: list[int] | None
    ) -> dict[str, Any]:
        """Host tensors of the response tokens (`lengths` per sample): rows/cols/targets/mask, plus the
        per-token batch fields that are set. Padded (``starts`` None): sample b is row b; packed: every
        sample is in row 0, its inputs beginning at column ``starts[b]``."""
        lens = np.asarray(lengths, dtype=np.int64)
        total = int(lens.sum())
        # The input position that predicts sample b's first response token, minus where b's response
        # tokens start in the flat layout: adding arange(total) gives every token's column. (numpy:
        # torch's CPU repeat_interleave took 3-7 ms here on the GPU host.)
        first = np.asarray(
            [(starts[b] if starts is not None else 0) + batch.tokens[i].shape[0] - lengths[b] - 1
             for b, i in enumerate(index)], dtype=np.int64,
        )  # fmt: skip
        shift = first - (np.cumsum(lens) - lens)
        rows = np.zeros(total, np.int64) if starts is not None else np.repeat(np.arange(len(index)), lens)
        fields = {
            "resp_rows": torch.from_numpy(rows),
            "resp_cols": torch.from_numpy(np.arange(total) + np.repeat(shift, lens)),
            "targets": torch.cat(
                [batch.tokens[i][-r:] if r else batch.tokens[i][:0] for i, r in zip(index, lengths)]
            ).long(),
            "lengths_t": torch.from_numpy(lens),
            "loss_mask": torch.cat([batch.loss_masks[i] for i in index]).float(),
        }
        for name in self.PER_TOKEN:
            xs = getattr(batch, name)
            if xs is not None:
                fields[name] = torch.cat([xs[i] for i in index]).float()
        temps = batch.temperatures
        if temps is not None and bool((temps[index] != 1.0).any()):  # the rollout's, per response token
            fields["temperature"] = torch.from_numpy(np.repeat(temps[index].numpy(), lens))
        return fields

    def _to_device(self, host: dict[str, Any]) -> dict[str, Any]:
        """The tensors of `host` on the trainer's device in one transfer (lists of tensors too)."""
        flat = [t for v in host.values() for t in (v if isinstance(v, list) else [v])]
        moved = iter(to_device_many(flat, self.device))
        return {k: [next(moved) for _ in v] if isinstance(v, list) else next(moved) for k, v in host.items()}

    def _make_micro_batch(self, batch: TrainBatch, index: list[int]) -> MicroBatch:
        seqs = [batch.tokens[i] for i in index]
        width = max(len(s) - 1 for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s) - 1] = s[:-1]
        lengths = [batch.samples[i].response_length for i in index]
        host = {"input_ids": ids, **self._response_fields(batch, index, lengths, None)}
        if batch.replay_routes is not None:
            routes = [batch.replay_routes[i] for i in index]
            num_layers, k = routes[0].shape[1], routes[0].shape[2]
            table = torch.zeros(len(seqs), width, num_layers, k, dtype=torch.long)
            for b, r in enumerate(routes):
                table[b, : r.shape[0]] = torch.as_tensor(r, dtype=torch.long)
            host["replay"] = [table[:, :, m].contiguous() for m in range(num_layers)]
        dev = self._to_device(host)
        return MicroBatch(index=index, lengths=lengths, **dev)

    def _make_packed_micro_batch(self, batch: TrainBatch, index: list[int]) -> MicroBatch:
        seq_lens = [batch.tokens[i].shape[0] - 1 for i in index]
        lens = np.asarray(seq_lens, dtype=np.int64)
        starts = np.cumsum(lens) - lens
        lengths = [batch.samples[i].response_length for i in index]
        host = {
            "input_ids": torch.cat([batch.tokens[i][:-1] for i in index]).long()[None],
            "position_ids": torch.from_numpy(np.arange(int(lens.sum())) - np.repeat(starts, lens))[None],
            **self._response_fields(batch, index, lengths, starts.tolist()),
        }
        if batch.replay_routes is not None:
            table = torch.cat([torch.as_tensor(batch.replay_routes[i], dtype=torch.long) for i in index])
            host["replay"] = [table[None, :, m].contiguous() for m in range(table.shape[1])]
        dev = self._to_device(host)
        return MicroBatch(index=index, lengths=lengths, seq_lens=seq_lens, offsets=starts.tolist(), **dev)

    def _autocast(self, model: CausalLM):
        """bf16 autocast for a --bf16 forward of a model still holding fp32 weights (e.g. a plugin's
        model passed in later); the trainer's own models are bf16 already and need none."""
        if self.args.bf16 and next(model.parameters()).dtype == torch.float32:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, model: CausalLM, mb: MicroBatch, record: bool = False, with_entropy: bool = True):
        """Response-token log-probs ``[N]``, entropies ``[N]``, the model output and routing state."""
        routing = (
            RoutingState(record=record or mb.replay is not None, replay=mb.replay)
            if (record or mb.replay is not None)
            else None
        )
        packed = {} if mb.seq_lens is None else dict(position_ids=mb.position_ids, seq_lens=mb.seq_lens)
        with self._autocast(model):
            # Project only the response positions: the [B, T, V] logits are never built (a hook
            # reading out.logits still gets them, computed lazily).
            if type(model).forward is CausalLM.forward:
                out = model(mb.input_ids, routing=routing, return_hidden=True, compute_logits=False, **packed)
            else:
                out = model(mb.input_ids, routing=routing, return_hidden=True, **packed)
            logits = self.response_logits(model, out, mb)
        if self.args.true_on_policy_mode:  # the sampler's formula: rollout log-probs match bitwise
            ent = entropy_from_logits(logits) if with_entropy else None
            return token_log_probs(logits, mb.targets), ent, out, routing
        logp, ent = log_probs_and_entropy(logits, mb.targets, with_entropy, fused=self.fused_loss)
        return logp, ent, out, routing

    def response_logits(self, model: CausalLM, out: Any, mb: MicroBatch) -> torch.Tensor:
        """The tempered logits ``[N, V]`` that predict ``mb``'s response tokens, from a forward's output."""
        if type(model).forward is CausalLM.forward:
            logits = model.lm_head(out.hidden[mb.resp_rows, mb.resp_cols])
        else:
            logits = out.logits[mb.resp_rows, mb.resp_cols]
        if mb.temperature is not None:
            if self.args.true_on_policy_mode:  # as the sampler tempers: fp32 logits / fp32 temperature
                return logits.float() / mb.temperature[:, None].float()
            logits = logits / mb.temperature[:, None].to(logits.dtype)
        return logits

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_log_probs(self, batch: TrainBatch, stage: str) -> list[torch.Tensor]:
        """Per-sample response log-probs under the policy (``old``) or reference model (``ref``)."""
        model = self.ref_model if stage == "ref" else self.model
        self.pm.hook.pre_forward(args=self.args, model=model, batch=batch, stage=stage)
        out: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        recorded: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for mb in self.micro_batches(batch, self._my_samples(batch)):
            logp, _, _, routing = self.forward(model, mb, record=batch.record_routes, with_entropy=False)
            if mb.filler:
                continue
            for j, (i, piece) in enumerate(zip(mb.index, logp.split(mb.lengths))):
                out[i] = piece.float().cpu()
                if batch.record_routes and routing is not None:
                    n = batch.tokens[i].shape[0] - 1
                    if mb.offsets is None:
                        rows = [t[j, :n] for t in routing.router_topk]
                    else:
                        rows = [t[0, mb.offsets[j] : mb.offsets[j] + n] for t in routing.router_topk]
                    recorded[i] = torch.stack(rows, dim=1).int().cpu()
        if batch.record_routes:
            batch.recorded_routes = recorded
        return out

    # ------------------------------------------------------------------ training

    def train(self, rollout_id: int, batch: TrainBatch) -> list[dict[str, float]]:
        """Train on one rollout; returns the metrics of each optimizer step."""
        args = self.args
        rollout_metrics = self._prepare(batch) if args.loss_type != "sft_loss" else {}
        # --num-steps-per-rollout contiguous steps of equal size (of --global-batch-size samples when the
        # rollout has rollout_batch_size x n_samples_per_prompt of them, as it does unless a generate
        # function returns several samples per prompt sample).
        critic_only = self.critic is not None and rollout_id < args.num_critic_only_steps  # critic alone
        all_metrics = []
        for idx in np.array_split(np.arange(len(batch)), min(args.num_steps_per_rollout, len(batch))):
            metrics = {} if critic_only else self._step(batch.subset(idx.tolist()))
            if self.critic is not None:
                metrics.update(self.critic.train_step(batch, idx.tolist()))
            all_metrics.append({**rollout_metrics, **metrics})
        return all_metrics

    def _prepare(self, batch: TrainBatch) -> dict[str, float]:
        """Old (and ref, teacher) log-probs and the advantages of a rollout; returns its mismatch metrics."""
        args = self.args
        batch.old_log_probs = self.compute_log_probs(batch, "old")
        if args.use_kl_loss or args.kl_coef:
            if self.ref_model is None:
                raise RuntimeError(
                    "a KL term needs the reference model; the loop builds it for --use-kl-loss"
                )
            batch.ref_log_probs = self.compute_log_probs(batch, "ref")
        metrics = self._mismatch(batch)
        if self.critic is not None:  # PPO: the critic's values (GAE reads them)
            metrics.update(self.critic.prepare(batch))
        trainer_old = batch.old_log_probs
        if args.use_rollout_logprobs:  # the estimators' KL shaping reads the rollout's, as slime's
            if batch.rollout_log_probs is None:
                raise UsageError(
                    "--use-rollout-logprobs needs the rollout's log-probs, but the samples carry none; make "
                    "the generate function record rollout_log_probs or drop the flag."
                )
            batch.old_log_probs = batch.rollout_log_probs
        try:
            batch.advantages = self.pm.hook.advantage(args=args, batch=batch)
        finally:
            batch.old_log_probs = trainer_old
        if batch.advantages is None:
            raise RuntimeError(
                f"no plugin computed advantages for --advantage-estimator {args.advantage_estimator}"
            )
        if args.use_opd:  # the teacher's log-probs pull each token's advantage
            metrics.update(distill.apply_opd(self, batch))
        return metrics

    def _mismatch(self, batch: TrainBatch) -> dict[str, float]:
        if batch.rollout_log_probs is None:
            return {}
        idx = list(range(len(batch)))
        train, roll = _cat(batch.old_log_probs, idx), _cat(batch.rollout_log_probs, idx)
        mask = _cat(batch.loss_masks, idx)
        metrics = mismatch_metrics(train, roll, mask)
        ratio = torch.exp(train - roll)
        clipped = ((ratio > self.args.tis_clip) | (ratio < self.args.tis_clip_low)).float()
        metrics["tis_clipfrac"] = float((clipped * mask).sum() / mask.sum().clamp(min=1))
        return metrics

    def _lr(self) -> float:
        return lr_at(self.args, self.args.lr, self.step, self.total_steps)

    def _step(self, batch: TrainBatch) -> dict[str, float]:
        args = self.args
        self.model.train()
        self.pm.hook.pre_forward(args=args, model=self.model, batch=batch, stage="train")
        idx = self._my_samples(batch)
        # Denominators of the whole step, whichever samples this process runs.
        mask_all = torch.cat([m.float() for m in batch.loss_masks])
        denom = float(mask_all.sum().clamp(min=1)) if args.calculate_per_token_loss else float(len(batch))
        sums: dict[str, Any] = {}
        for g in self.optimizer.param_groups:
            g["lr"] = self._lr()
        self.optimizer.zero_grad(set_to_none=True)
        mbs = list(self.micro_batches(batch, idx))
        for i, mb in enumerate(mbs):
            for k, v in self._micro_step(batch, mb, denom, last=i == len(mbs) - 1).items():
                sums[k] = sums.get(k, 0.0) + v
        sums = self._reduce_metrics(sums)
        grad_norm = self._clip_grad_norm(args.clip_grad if args.clip_grad > 0 else float("inf"))
        self.optimizer.step()
        self.step += 1
        # Loss metrics stayed on the device through the micro-batches (no host sync between them, so
        # the host queues micro-batch i+1 while the GPU runs i); one copy brings them all back.
        names = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
        values = torch.stack([sums[k].float().reshape(()) for k in names] + [grad_norm.float()]).tolist()
        metrics = {k: float(v) for k, v in sums.items() if not isinstance(v, torch.Tensor)}
        metrics.update(zip(names, values))
        metrics.update(grad_norm=values[-1], lr=self.optimizer.param_groups[0]["lr"])
        self.model.eval()
        self.pm.hook.post_step(args=args, step=self.step, model=self.model, metrics=metrics)
        return metrics

    def _reduce_metrics(self, sums: dict[str, Any]) -> dict[str, Any]:
        """The step's metric sums over every process (data-parallel ranks add theirs up)."""
        return sums

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the step's gradient to `max_norm` (total 2-norm); returns the norm before clipping."""
        if isinstance(self.optimizer, MasterAdamW):
            return self.optimizer.clip_grad_norm_(max_norm)
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def _micro_step(
        self, batch: TrainBatch, mb: MicroBatch, denom: float, last: bool = True
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch; returns its share of the step's metrics."""
        args = self.args
        logp, ent, out, _ = self.forward(self.model, mb, with_entropy=self.objective.needs_entropy)
        loss, metrics, extra = self.objective(
            batch, mb, logp, ent, denom, logits=lambda: self.response_logits(self.model, out, mb)
        )
        for aux in self.pm.hook.auxiliary_loss(args=args, model=self.model, inputs=mb, outputs=out):
            if aux is not None:
                aux_loss, aux_metrics = aux
                loss = loss + aux_loss
                metrics.update(aux_metrics or {})
        (loss * 0.0 if mb.filler else loss).backward()
        if isinstance(self.optimizer, MasterAdamW):
            self.optimizer.accumulate(last)  # fp32 sum over micro-batches
        # Hook metrics are per-micro-batch means; weight them by this micro-batch's share of the step.
        share = (
            (sum(float(batch.loss_masks[i].float().sum()) for i in mb.index) / denom)
            if args.calculate_per_token_loss
            else len(mb.index) / denom
        )
        metrics.update({k: v * share for k, v in extra.items()})
        return {k: v * 0 for k, v in metrics.items()} if mb.filler else metrics

    # ------------------------------------------------------------------ weights and state

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """HF-named policy tensors, for the weight sync to the engine and for saving."""
        return named_hf_tensors(self.model)

    def save_model(self, path: str | os.PathLike, tokenizer_src: str | None = None) -> None:
        """Write the policy as an HF checkpoint (config, safetensors, the tokenizer files)."""
        save_model(self.model, path, tokenizer_src=tokenizer_src)

    def state_dict(self) -> dict[str, Any]:
        critic = {} if self.critic is None else {"critic": self.critic.state_dict()}
        return {"optimizer": self.optimizer.state_dict(), "step": self.step, **critic}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        if self.critic is not None and "critic" in state:  # absent: a checkpoint of a run without one
            self.critic.load_state_dict(state["critic"])
