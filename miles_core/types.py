"""Data that flows through one rollout: `Sample` (one prompt + one response), `Status`, and `TrainBatch`.

`Sample` follows slime's field names so custom generate / reward functions written for slime read the
same attributes here. `TrainBatch` is what the train backend consumes: the samples of one rollout plus the
per-token tensors computed for them (log-probs, advantages) as the step proceeds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from miles_core.errors import UsageError


class Status(str, enum.Enum):
    """Where a sample stands. Finish reasons of the engine map onto COMPLETED, TRUNCATED and ABORTED.

    FAILED and ABORTED samples stay in their group (so groups keep their size) but train on nothing: their
    loss mask is zero and their reward takes no part in the group's advantage baseline (`EXCLUDED`).
    """

    PENDING = "pending"
    COMPLETED = "completed"  # stopped on EOS or a stop token
    TRUNCATED = "truncated"  # hit --rollout-max-response-len
    FAILED = "failed"  # generation or reward raised; excluded from training
    ABORTED = "aborted"  # cut off by --rollout-timeout; not rewarded, excluded from training


EXCLUDED = (Status.FAILED, Status.ABORTED)  # statuses whose samples train on nothing


@dataclass
class Sample:
    """One prompt and one sampled response, with everything the loop learns about it."""

    group_index: int | None = None  # which prompt group (n_samples_per_prompt samples share one)
    index: int | None = None  # global sample index within the rollout
    prompt: str | list[dict[str, str]] = ""  # text, or chat messages before the template is applied
    tokens: list[int] = field(default_factory=list)  # prompt tokens followed by response tokens
    response: str = ""  # decoded response text
    response_length: int = 0  # number of response tokens at the end of `tokens`
    label: str | None = None  # ground truth for the reward (from --label-key)
    reward: float | dict[str, Any] | None = None  # float, or dict read through --reward-key
    loss_mask: list[int] | None = None  # [response_length]; 0 drops a token from the loss
    weight_versions: list[int] = field(default_factory=list)  # weight version at the end of each engine call
    # [response_length] the weight version each response token was sampled under (a partial rollout's
    # continuation or an in-place weight update mixes versions); -1 for tokens no policy sampled (the user
    # turns multi_turn inserts, a failed sample's filler token).
    response_weight_versions: list[int] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None  # [response_length] log p of each sampled token
    rollout_routed_experts: Any = None  # int32 [len(tokens)-1, num_moe_layers, topk] (on_route_record)
    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)  # per-row extras (e.g. rm_type override)
    spec_info: dict[str, Any] = field(default_factory=dict)  # the engine's decode-strategy statistics
    # The sampling parameters the response was drawn with (temperature, top_p, top_k): the rollout's
    # request, replaced by what the engine reports it used; the trainer's log-probs use its temperature.
    sampling_params: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    @property
    def oldest_weight_version(self) -> int | None:
        """The oldest weight version any of its sampled response tokens came from (None: none known)."""
        sampled = [v for v in self.response_weight_versions if v >= 0]
        return min(sampled) if sampled else None

    def get_reward_value(self, reward_key: str | None = None) -> float:
        """The scalar reward: `reward` itself, or `reward[reward_key]` for dict rewards."""
        if isinstance(self.reward, dict):
            if not reward_key:
                raise ValueError(
                    f"sample {self.index} has a dict reward {sorted(self.reward)}; "
                    "pass --reward-key to choose which entry trains the policy."
                )
            return float(self.reward[reward_key])
        return float(self.reward if self.reward is not None else 0.0)


@dataclass
class TrainBatch:
    """The samples of one rollout, ready for training.

    Per-sample tensors are unpadded and aligned with the *response* tokens: entry `i` of
    `rollout_log_probs[j]` is the log-prob of response token `i` of sample `j`. The trainer pads or packs
    them per micro-batch, so nothing here depends on the layout.
    """

    samples: list[Sample]
    rewards: torch.Tensor  # float32 [num_samples], raw scalar rewards
    tokens: list[torch.Tensor]  # int64 [len(tokens)] per sample
    loss_masks: list[torch.Tensor]  # float32 [response_length] per sample
    rollout_log_probs: list[torch.Tensor] | None = None  # float32 [response_length] per sample
    old_log_probs: list[torch.Tensor] | None = None  # filled by the "old" forward
    ref_log_probs: list[torch.Tensor] | None = None  # filled by the "ref" forward (KL loss)
    advantages: list[torch.Tensor] | None = None  # float32 [response_length] per sample
    values: list[torch.Tensor] | None = None  # float32 [response_length] per sample: the critic's (PPO)
    # float32 [num_samples]: the temperature each response was sampled at (1.0 for greedy samples, whose
    # log-probs the engine reports untempered); the trainer's log-probs divide the logits by it.
    temperatures: torch.Tensor | None = None
    # Routing replay (mechanism in the core, policy in a plugin's pre_forward): per sample int32
    # [len(tokens)-1, L, topk].
    replay_routes: list[torch.Tensor] | None = None
    # Set to True to have the next forward record each sample's router top-k into `recorded_routes`.
    record_routes: bool = False
    recorded_routes: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def response_lengths(self) -> list[int]:
        return [s.response_length for s in self.samples]

    def subset(self, idx: list[int]) -> TrainBatch:
        """The same batch restricted to samples `idx` (used to split a rollout into optimizer steps)."""

        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        return TrainBatch(
            samples=[self.samples[i] for i in idx],
            rewards=self.rewards[idx],
            tokens=pick(self.tokens),
            loss_masks=pick(self.loss_masks),
            rollout_log_probs=pick(self.rollout_log_probs),
            old_log_probs=pick(self.old_log_probs),
            ref_log_probs=pick(self.ref_log_probs),
            advantages=pick(self.advantages),
            values=pick(self.values),
            temperatures=None if self.temperatures is None else self.temperatures[idx],
            replay_routes=pick(self.replay_routes),
            record_routes=self.record_routes,
            recorded_routes=pick(self.recorded_routes),
        )


@dataclass
class RolloutOptions:
    """How the rollout engine runs one rollout: a plugin's answer to ``pre_rollout``.

    The driver merges every plugin's answer (route capture if any asks; at most one decode strategy)
    and hands the result to the engine before the rollout starts.
    """

    capture_routes: bool = False  # report each token's experts (``on_route_record``)
    # Replaces the engine's one-token decode step, e.g. speculative decoding; for the built-in engine a
    # ``miles_core.api.DecodeStrategy``.
    decode_strategy: Any = None


__all__ = ["EXCLUDED", "RolloutOptions", "Sample", "Status", "TrainBatch", "UsageError"]
