"""The run-time side of R3: what each training-side forward replays or records, and what gets measured.

`RouteReplay` is the plugin's own state (never attributes on ``args``): the batch whose router choices
the "old" forward is recording, and the last measured mismatch. The core does the mechanics (the
trainer pads the replay tables per micro-batch, the MoE block recomputes gate weights at the replayed
experts); this module only decides, per stage, which tables the trainer gets.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from miles_core import Sample, TrainBatch, UsageError
from miles_r3.routes import (
    MismatchCount,
    RouteShape,
    check_routes,
    count_mismatch,
    decode_payload,
    placeholder_routes,
)

ROLLOUT, OLD, MEASURE = "rollout", "old", "measure"


def replay_mode(args: argparse.Namespace) -> str | None:
    """``rollout`` (replay the engine's routes), ``old`` (replay the old forward's), ``measure``, or None."""
    if args.use_rollout_routing_replay:
        return ROLLOUT
    if args.use_routing_replay:
        return OLD
    if args.record_routing_mismatch:
        return MEASURE
    return None


class RouteReplay:
    """Per-run state of the R3 plugin; one instance per configured run."""

    def __init__(self) -> None:
        self._pending: tuple[TrainBatch, list[np.ndarray | None]] | None = None
        self.last: MismatchCount | None = None  # mismatch measured at the latest "old" forward

    # ------------------------------------------------------------------ rollout side

    def prepare_engine(self, engine: Any) -> None:
        """Check the engine's model (a dense one fails here, before any token is generated) and forget
        the previous rollout's state; the plugin then asks the engine for route capture."""
        if getattr(getattr(engine, "model", None), "config", None) is not None:
            RouteShape.of_model(engine.model)
        self._pending, self.last = None, None

    def store(self, sample: Sample, routed_experts: Any) -> None:
        """Keep one sample's routes as int32; a base64 payload (SGLang) is decoded to ``[T-1, L*k]``.

        The payload's L and k are unknown until a model is at hand, so it is reshaped to 3-D in
        `check_routes` at the first forward.
        """
        if isinstance(routed_experts, (str, bytes)):
            flat = decode_payload(routed_experts)
            rows = len(sample.tokens) - 1
            arr = flat.reshape(rows, -1) if rows > 0 and flat.size % rows == 0 else flat
        else:
            arr = np.ascontiguousarray(np.asarray(routed_experts), dtype=np.int32)
        sample.rollout_routed_experts = arr

    @staticmethod
    def rollout_metrics(samples: list[Sample]) -> dict[str, float]:
        """Memory held by the rollout's stored routes."""
        arrays = [s.rollout_routed_experts for s in samples if s.rollout_routed_experts is not None]
        held = sum(int(np.asarray(a).nbytes) for a in arrays)
        tokens = sum(int(np.asarray(a).shape[0]) for a in arrays if np.asarray(a).ndim >= 2)
        metrics = {"routes_bytes": float(held)}
        if tokens:
            metrics["routes_bytes_per_token"] = held / tokens
        return metrics

    # ------------------------------------------------------------------ training side

    def before_forward(self, mode: str, model: Any, batch: TrainBatch, stage: str) -> None:
        """Install replay tables or ask for recording before the trainer's ``stage`` forward."""
        shape = RouteShape.of_model(model)
        self.harvest()
        if stage == "old":
            routes = self.rollout_routes(batch, shape, strict=mode == ROLLOUT)
            if mode == ROLLOUT:
                batch.replay_routes = self._tables(batch, routes, shape)
            batch.record_routes = True  # the router's own top-k, compared with the rollout's in harvest()
            self._pending = (batch, routes)
            return
        batch.record_routes = False  # a "ref" recording would overwrite the policy's
        if mode == ROLLOUT and batch.replay_routes is None:
            batch.replay_routes = self._tables(batch, self.rollout_routes(batch, shape, strict=True), shape)
        elif mode == OLD and stage == "train":
            if batch.recorded_routes is None:
                raise RuntimeError(
                    "--use-routing-replay: the 'old' forward recorded no routes for this batch; the train "
                    "backend must call pre_forward(stage='old') on the batch it later splits into steps"
                )
            batch.replay_routes = list(batch.recorded_routes)

    def rollout_routes(self, batch: TrainBatch, shape: RouteShape, strict: bool) -> list[np.ndarray | None]:
        """Each sample's checked rollout routes, or None for a sample that has none usable.

        A sample whose loss mask is all zero (failed, empty response) may lack routes or have a table of
        another length (an empty response gets a filler token); it is replayed with a placeholder and left
        out of the mismatch. A trained sample without routes is an error when ``strict`` (replay needs
        them), else it is only left out of the mismatch.
        """
        out: list[np.ndarray | None] = []
        for i, sample in enumerate(batch.samples):
            name = sample.index if sample.index is not None else i
            num_tokens = len(batch.tokens[i])
            trained = bool(batch.loss_masks[i].sum() > 0)
            routes = sample.rollout_routed_experts
            if routes is None:
                if strict and trained:
                    raise UsageError(
                        f"sample {name} has no rollout routes (its generate function did not report "
                        "them); use a generate function that calls on_route_record, e.g. single_turn, "
                        "or drop --use-rollout-routing-replay."
                    )
                out.append(None)
            elif trained:
                out.append(check_routes(routes, name, num_tokens, shape))
            else:
                try:
                    out.append(check_routes(routes, name, num_tokens, shape))
                except UsageError:
                    out.append(None)
        return out

    @staticmethod
    def _tables(batch: TrainBatch, routes: list[np.ndarray | None], shape: RouteShape) -> list[torch.Tensor]:
        return [
            torch.from_numpy(r if r is not None else placeholder_routes(len(t), shape))
            for r, t in zip(routes, batch.tokens)
        ]

    def harvest(self) -> None:
        """Compare the recorded router top-k of the last "old" forward with the rollout's, once available."""
        if self._pending is None or self._pending[0].recorded_routes is None:
            return
        batch, routes = self._pending
        total = MismatchCount()
        for rollout, recorded in zip(routes, batch.recorded_routes):
            if rollout is not None:
                total = total + count_mismatch(rollout, recorded)
        self.last = total if total.entries else None
        self._pending = None

    def step_metrics(self) -> dict[str, float]:
        """``routing_mismatch_frac`` (entries) and ``routing_mismatch_token_frac`` of the latest rollout."""
        self.harvest()
        if self.last is None:
            return {}
        return {
            "routing_mismatch_frac": self.last.entry_frac,
            "routing_mismatch_token_frac": self.last.token_frac,
        }
