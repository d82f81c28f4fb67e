"""Typed signatures of every function or object a user or plugin can plug into the loop.

A custom reward, generate function, advantage estimator, rollout backend or train backend satisfies one
of these ``Protocol``s; slime-compatible signatures, so functions written for slime work unchanged. The
backend protocols list exactly what the loop calls (a test checks it against the loop's code).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import torch

    from miles_core.types import RolloutOptions, Sample, TrainBatch


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
class Tool(Protocol):
    """``async def tool(args, arguments) -> str``: a tool the ``tool_call`` generate function may run.

    Installed under a name in the ``miles.tools`` entry-point group and offered with ``--tools NAME``. An
    optional ``spec`` attribute (an OpenAI function schema dict) is what a chat template's ``tools``
    variable shows the model. Runs in the rollout process, on the rollout's event loop: block it only
    briefly (start a subprocess or a thread for real work). A raised exception reaches the model as text.
    """

    async def __call__(self, args: argparse.Namespace, arguments: dict[str, Any]) -> str:
        """:param args: the parsed namespace (``--tool-timeout`` and friends).
        :param arguments: the call's ``arguments`` object, as the model wrote it.
        :returns: the text the model sees in the tool turn.
        """
        ...


@runtime_checkable
class RolloutFn(Protocol):
    """``generate_rollout(args, rollout_id, data_source, evaluation=False)``: slime's custom rollout function.

    Selected by ``--rollout-function-path``; replaces the built-in rollout of training rollouts (eval keeps
    the built-in one). Sync (run on a worker thread) or ``async`` (awaited on the rollout's event loop).
    ``data_source`` is a `miles_core.rollout.rollout_fn.RolloutDataSource`: ``get_samples(n)`` draws n
    prompts as groups of ``--n-samples-per-prompt`` pending samples, ``generate(groups)`` runs the configured
    generate function and reward on groups (awaitable), ``run(coro)`` runs a coroutine from a sync function.
    """

    def __call__(
        self, args: argparse.Namespace, rollout_id: int, data_source: Any, evaluation: bool = False
    ) -> Any:
        """:param rollout_id: the rollout's number (the policy of weight version ``rollout_id`` trains on it).
        :param data_source: draws prompts and runs the built-in generation (see the class docstring).
        :param evaluation: always False in miles (eval sets use the built-in rollout).
        :returns: ``list[list[Sample]]`` (groups; a sample without a reward is scored by the configured
            reward) or an object with ``samples`` (that list) and optionally ``metrics`` (a dict).
        """
        ...


@runtime_checkable
class AdvantageEstimator(Protocol):
    """An ``--advantage-estimator`` (entry-point group ``miles.advantages``; a class is instantiated once).

    Called by the trainer: ``advantages`` once per rollout (through the core's ``advantage`` hookimpl),
    ``policy_log_ratio`` once per training micro-batch. An estimator whose advantages compare each sample
    with the others of its group sets the class attribute ``group_relative = True``, so a run with
    ``--n-samples-per-prompt 1`` is warned that it learns nothing. One that sets ``needs_critic = True``
    (PPO) gets the torch trainer's value model: ``batch.values`` is set before ``advantages`` is called.
    """

    def advantages(self, args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor]:
        """:param batch: the rollout's batch, ``rewards`` float32 ``[num_samples]``, old/ref log-probs set.
        :returns: one float32 tensor ``[response_length]`` per sample.
        """
        ...

    def policy_log_ratio(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        loss_mask: torch.Tensor,
        lengths: torch.Tensor,
    ) -> torch.Tensor | None:
        """The log importance ratio of the clipped policy loss, flat ``[num_tokens]`` over a micro-batch's
        response tokens (``lengths`` int64 ``[num_samples]``), or ``None`` for the per-token
        ``log_probs - old_log_probs``. GSPO returns its sequence-level ratio here.
        """
        ...


@runtime_checkable
class TISFunction(Protocol):
    """``--custom-tis-function-path`` (with ``--use-tis``): slime's ``vanilla_tis_function`` signature.

    Called by the trainer inside the loss of each micro-batch (``loss_correction``), after OPSM and before
    IcePop, when the samples carry rollout log-probs. `miles_core.train.mis.compute_mis_weights` is one.
    """

    def __call__(
        self,
        args: argparse.Namespace,
        *,
        pg_loss: torch.Tensor,
        train_log_probs: list[torch.Tensor],
        rollout_log_probs: list[torch.Tensor],
        loss_masks: list[torch.Tensor],
        total_lengths: list[int] | None,
        response_lengths: list[int],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, torch.Tensor]]:
        """:param pg_loss: float32 ``[num_tokens]``, the micro-batch's per-token policy loss (with grad).
        :param train_log_probs: per sample float32 ``[response_length]``: the trainer's log-probs before
            the update (detached).
        :param rollout_log_probs: per sample, the engine's log-probs of the same tokens.
        :param loss_masks: per sample float32 ``[response_length]``.
        :param total_lengths: per sample ``len(tokens)`` (prompt + response).
        :returns: ``(pg_loss [num_tokens], masks, metrics)``: the reweighted loss, each sample's mask
            with rejected tokens zeroed (they leave the numerators, the denominators keep them), and
            metrics, each a float32 ``[num_tokens]`` tensor averaged over the incoming mask (sample mean,
            or token mean with ``--calculate-per-token-loss``) or a 0-d value.
        """
        ...


@runtime_checkable
class PgLossReducerFactory(Protocol):
    """``--custom-pg-loss-reducer-function-path``: builds the pg_loss reducer of one micro-batch (slime's
    signature; `miles_core.train.reducers.get_pg_loss_reducer` is Dr. GRPO's). The other loss terms and
    metrics keep the default reducer."""

    def __call__(
        self,
        total_lengths: list[int],
        response_lengths: list[int],
        loss_masks: list[torch.Tensor],
        calculate_per_token_loss: bool,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """:param loss_masks: per sample, after the corrections' rejections.
        :returns: a function from the flat ``pg_loss [num_tokens]`` to the micro-batch's sum over samples
            (of each sample's reduced loss) or over tokens; the trainer divides it by the optimizer step's
            sample (or token) count, as slime's Megatron scaling does.
        """
        ...


@runtime_checkable
class CustomLossFn(Protocol):
    """``--loss-type custom_loss --custom-loss-function-path``: replaces the whole per-micro-batch loss
    (slime's ``(args, batch, logits, sum_of_sample_mean)``; plugins' auxiliary losses are still added)."""

    def __call__(
        self,
        args: argparse.Namespace,
        batch: dict[str, Any],
        logits: torch.Tensor,
        sum_of_sample_mean: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:param batch: slime's keys, per sample lists: ``unconcat_tokens`` (int64 ``[len(tokens)]``),
            ``total_lengths``, ``response_lengths``, ``loss_masks``, ``log_probs`` (old), ``ref_log_probs``,
            ``rollout_log_probs``, ``advantages`` (float32 ``[response_length]`` or None), ``rewards``,
            ``samples``; and ``targets`` (int64 ``[num_tokens]``, the response tokens, flat).
        :param logits: ``[num_tokens, V]`` logits (the rollout's temperature applied) at the positions
            that predict the response tokens, in ``targets`` order; with gradient. (slime passes the whole
            packed sequence's; only these rows are computed here.)
        :param sum_of_sample_mean: per-token ``[num_tokens]`` -> this micro-batch's share of the step's
            mean (sample mean, or token mean with ``--calculate-per-token-loss``).
        :returns: ``(loss, metrics)``: the scalar loss with gradient, already scaled as the step's share
            (``sum_of_sample_mean`` does that), and metrics summed over the step's micro-batches.
        """
        ...


@runtime_checkable
class RolloutBackend(Protocol):
    """A rollout backend (``--rollout-backend``): exactly what the loop, the rollout manager and the
    built-in generate functions call. Built with ``from_args(args, model, tokenizer)`` (a classmethod).

    ``generate`` runs on the rollout's event loop. With ``--async`` that loop runs on a thread of its own
    and the control calls (``update_weights``, ``pause_generation``, ``continue_generation``, ``abort``)
    come from the trainer's thread while requests are in flight, so they must be thread-safe; ``abort``
    is also called from a worker thread of the rollout's loop."""

    in_process: bool
    """Whether the backend decodes with the model the loop loads for it (``from_args`` gets it, with the
    plugins' ``configure_model(role="rollout")`` applied). A served backend says False: ``from_args`` gets
    None and its servers load and configure their own."""

    weight_version: int
    """The version of the weights now served; ``weight_versions`` of each sample records it. The loop
    sets it when a run resumes."""

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: torch.nn.Module, tokenizer: Any) -> RolloutBackend:
        """The backend the flags ask for, serving ``model`` (weights on their device and dtype)."""
        ...

    async def generate(
        self, input_ids: list[int], sampling_params: dict[str, Any], rid: str | None = None
    ) -> Any:
        """Sample a continuation; returns an ``EngineOutput`` (``output_ids``, ``log_probs``,
        ``finish_reason`` (``stop``, ``length``, or ``abort`` with the tokens so far), ``weight_version``,
        ``output_weight_versions`` (one per output token), ``routed_experts``, ``spec_info``,
        ``sampling_params``).

        :param rid: the request's id, unique within the run, by which ``abort`` finds it.
        """
        ...

    def abort(self, rid: str | None = None) -> int:
        """End request ``rid`` (every request when None) now: it returns its tokens so far with finish
        reason ``abort``. Returns how many requests were aborted."""
        ...

    def pause_generation(self, mode: str = "in_place") -> int:
        """Stop decoding before a weight update. ``in_place``: requests in flight keep their state and go
        on at ``continue_generation``; ``abort``: they all return now (finish reason ``abort``). New
        requests wait until ``continue_generation``. Returns how many requests were aborted."""
        ...

    def continue_generation(self) -> None:
        """Resume decoding after ``pause_generation``."""
        ...

    def set_rollout_options(self, options: RolloutOptions) -> None:
        """Apply the plugins' merged ``pre_rollout`` answers (route capture, decode strategy)."""
        ...

    def reseed(self, seed: int) -> None:
        """Reset the sampling randomness (per rollout, so a resumed run repeats its samples)."""
        ...

    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far (for ``rollout/tok_per_s``)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new policy weights and start serving them as ``version``.

        :param named_tensors: ``(HF parameter name, tensor)`` pairs in the trainer's dtype; may be a
            generator so the full model never has to sit in memory twice.
        :param version: the new weight version (the number of completed rollouts).
        :returns: nothing; on return, every new request sees the new weights, and every token sampled
            after it is labelled ``version``.
        """
        ...

    def metrics(self) -> dict[str, float]:
        """Backend statistics, logged with each rollout as ``rollout/<name>`` (e.g. an HTTP backend's
        ``engine_restarts`` and ``retries``, counted over the run); may be empty."""
        ...

    def close(self) -> None:
        """Release what the backend started (an HTTP backend stops its server processes); called once at
        the end of the run, also when it fails."""
        ...


@runtime_checkable
class TrainBackend(Protocol):
    """A training backend (``--train-backend``): exactly what the loop calls. Built as
    ``Backend(args, pm, policy, ref)`` with the loaded policy and (for a KL term) reference models."""

    def train(self, rollout_id: int, batch: TrainBatch) -> list[dict[str, float]]:
        """Run the optimizer steps of one rollout (``--num-steps-per-rollout``): old/ref log-probs,
        advantages (the ``advantage`` hook), then the steps.

        :param rollout_id: 0-based index of the rollout.
        :param batch: the rollout's batch.
        :returns: each optimizer step's metrics ``{name: float}``.
        """
        ...

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The policy weights as ``(HF name, tensor)`` pairs, for ``RolloutBackend.update_weights``."""
        ...

    def save_model(self, path: str, tokenizer_src: str | None) -> None:
        """Write the policy as an HF checkpoint folder (tokenizer files copied from ``tokenizer_src``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a resume needs (optimizer, step count), ``torch.save``-able
        and loadable with ``weights_only=True``."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the weights come from the checkpoint's ``model/``).
        A backend that saves with ``save_state`` gets ``{"sharded": checkpoint folder}``."""
        ...

    # Optional: ``close()``, if defined, is called once at the end of the run (after the final model is
    # saved, also when the run fails) to stop what the backend started, e.g. trainer rank processes.
    # ``save_state(folder)``, defined by a backend whose state is sharded over processes, is called
    # instead of ``state_dict`` and writes into the checkpoint folder itself.
