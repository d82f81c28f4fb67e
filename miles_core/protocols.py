"""Typed signatures of every function or object a user or plugin can plug into the loop.

A custom reward, generate function, rollout engine or train backend satisfies one of these ``Protocol``s;
slime-compatible signatures, so functions written for slime work unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import torch

    from miles_core.types import Sample, TrainBatch


@runtime_checkable
class RewardFn(Protocol):
    """``async def reward(args, sample) -> float | dict`` (``--rm-type``, ``--custom-rm-path``).

    Called by the rollout manager once per finished sample. Return a float, or a dict of named rewards of
    which ``--reward-key`` picks the one that trains the policy. Raise ``UsageError`` for a bad label.
    """

    async def __call__(self, args: argparse.Namespace, sample: Sample) -> float | dict[str, Any]:
        """:param args: the parsed namespace.
        :param sample: the finished sample (``response``, ``label``, ``metadata`` set).
        :returns: the reward.
        """
        ...


@runtime_checkable
class GroupRewardFn(Protocol):
    """``async def reward(args, samples) -> list[float | dict]`` (``--custom-rm-path`` with ``--group-rm``).

    Called once per prompt group with its ``n_samples_per_prompt`` samples, e.g. for a reward model that
    scores the group in one request or ranks the responses against each other.
    """

    async def __call__(self, args: argparse.Namespace, samples: list[Sample]) -> list[float | dict[str, Any]]:
        """:param args: the parsed namespace.
        :param samples: the finished samples of one group.
        :returns: one reward per sample, in order.
        """
        ...


@runtime_checkable
class GenerateFn(Protocol):
    """``async def generate(args, sample, sampling_params) -> Sample | list[Sample]``.

    Selected by ``--custom-generate-function-path``. Fills ``tokens``, ``response``, ``response_length``,
    ``rollout_log_probs``, ``loss_mask`` and ``status`` of the sample; a multi-turn function may return
    several samples (one per turn) that share the group.
    """

    async def __call__(
        self, args: argparse.Namespace, sample: Sample, sampling_params: dict[str, Any]
    ) -> Sample | list[Sample]:
        """:param args: the parsed namespace.
        :param sample: the pending sample with ``prompt`` (and ``tokens`` of the prompt) set.
        :param sampling_params: ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``, ``stop``, ...
        :returns: the finished sample(s).
        """
        ...


@runtime_checkable
class RolloutEngine(Protocol):
    """What the loop needs of a rollout backend (``--rollout-backend``) besides generation itself.

    Generation is reached through the backend's generate function, whose request type is the backend's
    own; the loop only syncs weights and reads which version the engine serves.
    """

    weight_version: int
    """The version of the weights now served; ``weight_versions`` of each sample records it."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights and start serving them as ``version``.

        :param named_tensors: ``(HF parameter name, tensor)`` pairs in the trainer's dtype; may be a
            generator so the full model never has to sit in memory twice.
        :param version: the new weight version (the number of completed rollouts).
        :returns: nothing; on return, every new request sees the new weights.
        """
        ...


@runtime_checkable
class TrainBackend(Protocol):
    """A training backend (``--train-backend``): the built-in torch trainer, or Megatron."""

    def compute_log_probs(self, batch: TrainBatch, stage: str) -> list[torch.Tensor]:
        """Forward the batch without grad and return per-sample log-probs of the response tokens.

        :param batch: the rollout's batch.
        :param stage: ``"old"`` (the policy before the update) or ``"ref"`` (the reference model).
        :returns: one float32 tensor ``[response_length]`` per sample (also stored on ``batch``).
        """
        ...

    def train(self, rollout_id: int, batch: TrainBatch) -> dict[str, float]:
        """Run the optimizer steps of one rollout (``--num-steps-per-rollout``).

        :param rollout_id: 0-based index of the rollout.
        :param batch: the rollout's batch with advantages set.
        :returns: the rollout's training metrics ``{name: float}``.
        """
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The policy weights as ``(HF name, tensor)`` pairs, for ``RolloutEngine.update_weights``."""
        ...

    def save(self, path: str) -> None:
        """Write a complete checkpoint (model, optimizer, scheduler, RNG) to ``path`` atomically."""
        ...

    def load(self, path: str) -> None:
        """Restore the state written by ``save(path)``."""
        ...
