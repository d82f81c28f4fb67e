"""Debug rollout dumps: ``--save-debug-rollout-data`` writes each rollout's samples,
``--load-debug-rollout-data`` trains on them instead of generating (`ReplayedRollouts`, with
``--debug-train-only``: no engine at all).

A dump is slime's layout, ``{"rollout_id": int, "samples": [dict per Sample]}`` in a ``.pt`` file, holding
only plain values and tensors so it loads with ``torch.load(weights_only=True)`` (no pickle of objects).
Every field of `Sample` round-trips exactly (floats as Python floats), so the same flags train on a
reloaded dump to the same weights as the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles_core.atomic import atomic_write_bytes
from miles_core.logging import get_logger
from miles_core.types import EXCLUDED, Sample, Status, UsageError

log = get_logger(__name__)

FIELDS = tuple(f.name for f in dataclasses.fields(Sample))


def dump_path(template: str, rollout_id: int | str) -> Path:
    """The file of rollout ``rollout_id``: ``template`` with ``{rollout_id}`` filled in."""
    return Path(template.format(rollout_id=rollout_id))


def sample_to_dict(sample: Sample) -> dict[str, Any]:
    """Every field of ``sample`` as plain values; routes (a numpy array) become a tensor."""
    out = {name: getattr(sample, name) for name in FIELDS}
    out["status"] = sample.status.value
    routes = sample.rollout_routed_experts
    if routes is not None and not isinstance(routes, (str, bytes, torch.Tensor)):
        out["rollout_routed_experts"] = torch.from_numpy(np.ascontiguousarray(np.asarray(routes)))
    return out


def sample_from_dict(row: dict[str, Any], where: str) -> Sample:
    """The `Sample` that `sample_to_dict` wrote (``where`` names it in errors)."""
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise UsageError(
            f"{where} has fields {unknown} that miles' Sample lacks; load a dump written by "
            "--save-debug-rollout-data."
        )
    sample = Sample(**row)
    sample.status = Status(sample.status)
    if isinstance(sample.rollout_routed_experts, torch.Tensor):
        sample.rollout_routed_experts = sample.rollout_routed_experts.numpy()
    return sample


def save_rollout(template: str, rollout_id: int, samples: list[Sample], evaluation: bool = False) -> Path:
    """Write rollout ``rollout_id``'s samples to its dump file (atomically, parents created); an
    evaluation's (every eval set's samples, in order) go to ``eval_<rollout_id>`` as in slime."""
    path = dump_path(template, f"eval_{rollout_id}" if evaluation else rollout_id)
    buf = io.BytesIO()
    torch.save({"rollout_id": rollout_id, "samples": [sample_to_dict(s) for s in samples]}, buf)
    atomic_write_bytes(path, buf.getvalue())
    what = "evaluation" if evaluation else "rollout"
    log.info("saved %s %d's %d samples to %s", what, rollout_id, len(samples), path)
    return path


def load_rollout(template: str, rollout_id: int) -> list[Sample]:
    """The samples of rollout ``rollout_id``'s dump file."""
    path = dump_path(template, rollout_id)
    if not path.is_file():
        raise UsageError(
            f"--load-debug-rollout-data: {path} (rollout {rollout_id}) does not exist; write it with "
            "--save-debug-rollout-data or lower --num-rollout."
        )
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise UsageError(
            f"--load-debug-rollout-data: {path} is not a rollout dump ({e}); pass files that "
            "--save-debug-rollout-data wrote."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), list) or not data["samples"]:
        raise UsageError(
            f"--load-debug-rollout-data: {path} holds no samples; pass files that --save-debug-rollout-data "
            "wrote."
        )
    return [sample_from_dict(row, f"{path} sample {i}") for i, row in enumerate(data["samples"])]


def replay_metrics(samples: list[Sample], reward_key: str | None) -> dict[str, float]:
    """What a replayed rollout can tell without regenerating it: its saved rewards and lengths."""
    kept = [s for s in samples if s.status not in EXCLUDED]
    rewards = [s.get_reward_value(reward_key) if s.reward is not None else 0.0 for s in kept]
    n = len(samples)
    return {
        "rollout/reward_mean": sum(rewards) / max(len(rewards), 1),
        "rollout/response_len_mean": sum(s.response_length for s in samples) / n,
        "rollout/num_samples": float(n),
    }


class ReplayedRollouts:
    """The rollouts of ``--load-debug-rollout-data``: rollout k is read from its dump file. There is no
    engine, so weight updates go nowhere and nothing is evaluated."""

    def __init__(self, args: Any) -> None:
        self.template, self.reward_key = args.load_debug_rollout_data, args.reward_key

    def take(self, rollout_id: int) -> tuple[list[Sample], dict[str, float]]:
        samples = load_rollout(self.template, rollout_id)
        return samples, replay_metrics(samples, self.reward_key)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """No engine serves the weights under --debug-train-only."""

    def evaluate(self, rollout_id: int) -> dict[str, float]:
        raise RuntimeError("--debug-train-only evaluates nothing (validate refuses --eval-prompt-data).")

    def data_state(self, rollout_id: int) -> None:
        """No prompt data is read: a checkpoint records no data position."""
        return None

    def close(self) -> None:
        """Nothing runs in the background."""

    def __enter__(self) -> ReplayedRollouts:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
