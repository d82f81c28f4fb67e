"""The contract between the miles core and its plugins: every hook a plugin may implement.

Plugins implement these with ``@miles_core.hookimpl`` and register through the ``miles.plugins``
entry-point group. Every hook takes keyword arguments only; a plugin may accept any subset of them.
In the single-process default every hook runs in the one process; the docstrings say which role
(driver, rollout engine, trainer) calls each so the same plugin works once roles move into actors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    import pluggy
    import torch

    from miles_core.types import RolloutOptions, Sample, TrainBatch

hookspec = pluggy.HookspecMarker("miles")


# -------------------------------------------------------------------------------------------------
# setup
# -------------------------------------------------------------------------------------------------


@hookspec
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's command-line flags.

    Called once by the driver while the ``miles train`` parser is built, before anything is parsed.
    Put the flags in a group of their own (``parser.add_argument_group("r3")``) so ``--help`` shows
    where each comes from. Flags use ``--kebab-case`` and keep slime/miles names where one exists.

    :param parser: the ``argparse.ArgumentParser`` of ``miles train``.
    :returns: nothing.
    """


@hookspec
def configure(args: argparse.Namespace, pm: pluggy.PluginManager) -> bool | None:
    """Validate flag combinations once after parsing, say whether the plugin is active, and register the
    run's own hook object when it is.

    Called once by the driver, after ``--config`` files are merged and before any model is loaded.
    Raise ``miles_core.UsageError`` with one sentence naming the bad combination and the fix.
    An active plugin keeps its per-run state on an object that implements the run's hooks and
    registers it (``pm.register(MyRun(args))``, as pytest plugins do in ``pytest_configure``); an idle
    one registers nothing, so its hooks never run. No state goes on ``args`` or on core objects.

    :param args: the parsed namespace (read-only by convention; a plugin may fill in defaults of its
        own flags, e.g. one flag implied by another).
    :param pm: the run's plugin manager, to register the per-run object with.
    :returns: ``True`` if the plugin's features are on for this run, ``False`` if installed but idle,
        ``None`` if it has no notion of being active. ``miles plugins`` and the run log show this.
    """


@hookspec
def configure_model(args: argparse.Namespace, model: torch.nn.Module, role: str) -> None:
    """Adapt a freshly built model before it is used, e.g. swap linear layers for quantized ones.

    Called once per model instance right after its weights are loaded: by the trainer for
    ``role="train"`` and ``role="ref"``, and by the rollout engine for ``role="rollout"``. Use
    ``miles_core.api.swap_modules`` to replace modules by name; the call sites stay the same.

    :param args: the parsed namespace.
    :param model: the ``miles_core.api.CausalLM`` (parameters on their final device and dtype).
    :param role: ``"train"``, ``"ref"`` or ``"rollout"``.
    :returns: nothing.
    """


# -------------------------------------------------------------------------------------------------
# rollout
# -------------------------------------------------------------------------------------------------


@hookspec
def pre_rollout(args: argparse.Namespace, rollout_id: int, engine: Any) -> RolloutOptions | None:
    """Say how the engine should run one rollout, and read what the plugin needs of it.

    Called by the driver before each rollout's generation starts (after the weight sync of the
    previous step; with ``--async`` on the rollout thread, while the trainer may still be training on
    an earlier rollout, and ``engine.weight_version`` may lag ``rollout_id`` by up to
    ``--max-weight-staleness``). The driver merges the answers (route capture if any plugin asks; at most one
    decode strategy, else a ``UsageError``) and hands them to the engine: R3 asks for route capture,
    speculative RL returns its speculative decoder. Do not set attributes on ``engine``.

    :param args: the parsed namespace.
    :param rollout_id: 0-based index of the rollout about to run.
    :param engine: the rollout engine (``miles_core.api.Engine`` for the built-in backend), to read
        (its ``model``, ``kv_cache``, ``device``).
    :returns: ``miles_core.types.RolloutOptions`` or ``None`` (nothing to ask).
    """


@hookspec
def on_route_record(args: argparse.Namespace, sample: Sample, routed_experts: Any) -> None:
    """Receive the experts the rollout engine routed each token of one finished sample to.

    Called by the generate function once per finished sample, only while route capture is on (a
    plugin asked for it in ``pre_rollout``). Row ``t`` holds the experts chosen when token ``t`` was
    the input, so the last token (never fed back) has no row.

    :param args: the parsed namespace.
    :param sample: the finished ``Sample`` (tokens, status and log-probs already set).
    :param routed_experts: ``numpy.ndarray`` int32 ``[len(sample.tokens) - 1, num_moe_layers, topk]``.
    :returns: nothing.
    """


@hookspec
def rollout_metrics(args: argparse.Namespace, rollout_id: int, samples: list[Sample]) -> dict | None:
    """Report plugin metrics for one finished rollout (after rewards are assigned).

    Called by the driver once per rollout; the returned dicts are merged into the rollout's logged
    metrics as ``rollout/<key>`` (the driver adds the prefix; use a plugin prefix inside the key,
    e.g. ``int4/weight_bytes``, if it could clash).

    :param args: the parsed namespace.
    :param rollout_id: 0-based index of the rollout.
    :param samples: every sample of the rollout, rewards set.
    :returns: ``{name: float}`` or ``None``.
    """


@hookspec
def post_reward(args: argparse.Namespace, samples: list[Sample]) -> None:
    """Reshape the rewards of a training rollout after scoring, e.g. DAPO's overlong penalty.

    Called by the driver once per training rollout, after the reward function has scored every sample
    and before the rollout's metrics are computed and the samples go to training. Not called for
    evaluation, so eval accuracy stays the raw reward. Change ``sample.reward`` in place: add to a
    float, or to the entry ``args.reward_key`` names in a dict reward. Skip samples whose ``status`` is
    ``Status.FAILED`` or ``Status.ABORTED`` (their reward is a placeholder 0).

    :param args: the parsed namespace.
    :param samples: every sample of the rollout, group-major, ``reward`` and ``response_length`` set.
    :returns: nothing.
    """


# -------------------------------------------------------------------------------------------------
# train step
# -------------------------------------------------------------------------------------------------


@hookspec
def pre_forward(args: argparse.Namespace, model: torch.nn.Module, batch: TrainBatch, stage: str) -> None:
    """Prepare one training-side forward over ``batch``.

    Called by the trainer before the forward passes of each stage over the whole rollout batch (the
    trainer then splits it into micro-batches itself, so per-sample fields stay aligned). R3 sets
    ``batch.replay_routes`` (per sample int32 ``[len(tokens)-1, L, topk]``) or
    ``batch.record_routes``; quantization plugins switch the model's forward mode.

    :param args: the parsed namespace.
    :param model: the model about to run (the policy, or the reference model for ``"ref"``).
    :param batch: the rollout's ``TrainBatch`` (or the optimizer step's slice of it for ``"train"``).
    :param stage: ``"ref"`` (reference log-probs), ``"old"`` (log-probs before the update) or
        ``"train"`` (forward + backward of an optimizer step).
    :returns: nothing.
    """


@hookspec(firstresult=True)
def advantage(args: argparse.Namespace, batch: TrainBatch) -> list[torch.Tensor] | None:
    """Compute per-token advantages for the batch.

    Called by the trainer once per rollout after ``old``/``ref`` log-probs are in ``batch``.
    ``firstresult``: the first non-``None`` answer wins; the core registers the estimators of
    ``--advantage-estimator`` as a plugin, so a plugin that wants to override must answer first
    (``@hookimpl(tryfirst=True)``) and return ``None`` when it has nothing to say.

    :param args: the parsed namespace.
    :param batch: the rollout's ``TrainBatch``; ``rewards`` float32 ``[num_samples]``.
    :returns: one float32 tensor ``[response_length]`` per sample, or ``None``.
    """


@hookspec
def loss_correction(args: argparse.Namespace, terms: Any) -> dict | None:
    """Correct the policy-gradient loss of one micro-batch for train/rollout mismatch.

    Called by the trainer inside the loss, once per micro-batch, after the clipped PPO loss is formed
    per token and before it is aggregated. TIS and IcePop are the core's implementations.

    :param args: the parsed namespace.
    :param terms: ``miles_core.api.LossTerms``: flat float32 tensors ``[num_tokens]`` over the
        micro-batch's response tokens: ``log_probs`` (current, with grad), ``old_log_probs`` (the PPO
        ratio's; the rollout's with ``--use-rollout-logprobs``), ``train_log_probs`` (the trainer's
        before the update, or ``None`` when equal to ``old_log_probs``), ``rollout_log_probs`` (may be
        ``None``), ``advantages``, ``loss_mask``, and ``pg_loss`` (per-token loss); ``lengths`` and
        ``total_lengths`` per sample. A hook may replace ``terms.pg_loss`` (e.g. multiply by a weight) or
        zero entries of ``terms.loss_mask``: those tokens leave the numerators of every loss term, the
        denominators keep them.
    :returns: ``{metric: float}`` averaged into the step's metrics, or ``None``.
    """


@hookspec
def auxiliary_loss(args: argparse.Namespace, model: torch.nn.Module, inputs: Any, outputs: Any) -> Any:
    """Add a loss term of the plugin's own to one micro-batch (e.g. the MTP draft loss).

    Called by the trainer once per training micro-batch after the policy loss is computed.

    :param args: the parsed namespace.
    :param model: the policy model.
    :param inputs: ``miles_core.api.MicroBatch`` (padded ``input_ids`` ``[B, T]``,
        ``attention_mask``, ``targets``, response ``loss_mask``).
    :param outputs: ``miles_core.api.ModelOutput`` of the forward (``logits`` and ``hidden``).
    :returns: ``(loss, metrics)`` with a scalar tensor that joins the backward pass, or ``None``.
    """


@hookspec
def post_step(args: argparse.Namespace, step: int, model: torch.nn.Module, metrics: dict) -> None:
    """Act after each optimizer step.

    Called by the trainer after ``optimizer.step()``; ``metrics`` may be extended in place and is
    logged afterwards.

    :param args: the parsed namespace.
    :param step: global optimizer step count, starting at 1.
    :param model: the policy model with updated weights.
    :param metrics: the step's metrics ``{name: float}``.
    :returns: nothing.
    """


# -------------------------------------------------------------------------------------------------
# checkpoint conversion (`miles convert`)
# -------------------------------------------------------------------------------------------------


@hookspec
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's flags to ``miles convert`` (e.g. the options of its target format).

    Called once by the driver while the ``miles convert`` parser is built. The core defines
    ``--hf-checkpoint`` (input folder), ``--output`` and ``--to NAME``.

    :param parser: the ``argparse.ArgumentParser`` of ``miles convert``.
    :returns: nothing.
    """


@hookspec(firstresult=True)
def convert_checkpoint(args: argparse.Namespace, input_dir: str, output_dir: str) -> bool | None:
    """Convert an HF checkpoint, if the flags ask for a conversion this plugin owns.

    Called by the driver of ``miles convert``; ``firstresult``: the first plugin that returns ``True``
    did the conversion. Write the output atomically (``miles_core.api.atomic_dir``).

    :param args: the parsed ``miles convert`` namespace (``args.to`` names the target format).
    :param input_dir: folder of the source HF checkpoint (config.json, safetensors, tokenizer files).
    :param output_dir: folder to write the converted checkpoint to.
    :returns: ``True`` if this plugin converted the checkpoint, else ``None``.
    """
