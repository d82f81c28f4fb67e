"""Checks of parsed `miles train` flags, each failing with one sentence that names the flag and the fix.

`validate` runs after every parse (also for `miles rm-check`); `check_run_args` adds what only a training
run needs and derives the batch layout (``--global-batch-size``, ``--num-steps-per-rollout``). Both run
before any file is read or any model loads.
"""

from __future__ import annotations

import argparse

from miles_core import drivers
from miles_core.args_agentic import check_agentic_args
from miles_core.args_algo import check_algo_args
from miles_core.args_megatron import check_parallel_args
from miles_core.args_ops import check_ops_args
from miles_core.args_ppo import check_ppo_args
from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.train.losses import check_loss_args
from miles_core.train.on_policy import check_true_on_policy

log = get_logger(__name__)

# Flags that count things: each must be at least 1 when given (None means "not set" where allowed).
POSITIVE_INTS = (
    "rollout_batch_size",
    "n_samples_per_prompt",
    "num_rollout",
    "rollout_max_response_len",
    "rollout_max_prompt_len",
    "rollout_max_batch_size",
    "global_batch_size",
    "num_steps_per_rollout",
    "micro_batch_size",
    "max_tokens_per_gpu",
    "save_interval",
    "keep_last_n_checkpoints",
    "eval_interval",
    "n_samples_per_eval_prompt",
    "eval_max_response_len",
    "rm_concurrency",
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_numbers(args: argparse.Namespace) -> None:
    """Counts at least 1, temperatures at least 0, top-p in (0, 1], non-negative rates and timeouts."""
    values = vars(args)
    for dest in POSITIVE_INTS:
        if values[dest] is not None and values[dest] < 1:
            raise UsageError(f"{_flag(dest)} must be at least 1, got {values[dest]}.")
    for dest in ("rollout_temperature", "eval_temperature"):
        if values[dest] is not None and values[dest] < 0:
            raise UsageError(f"{_flag(dest)} must be 0 (greedy) or more, got {values[dest]}.")
    for dest in ("rollout_top_p", "eval_top_p"):
        if values[dest] is not None and not 0 < values[dest] <= 1:
            raise UsageError(f"{_flag(dest)} must be in (0, 1] (1 keeps every token), got {values[dest]}.")
    for dest in ("lr", "min_lr", "weight_decay", "clip_grad", "eps_clip", "kl_loss_coef", "kl_coef"):
        if values[dest] < 0:
            raise UsageError(f"{_flag(dest)} must be 0 or more, got {values[dest]}.")
    if args.rm_timeout is not None and args.rm_timeout <= 0:
        raise UsageError(f"--rm-timeout must be a positive number of seconds, got {args.rm_timeout}.")


def check_async_args(args: argparse.Namespace) -> None:
    """The async/partial-rollout flags agree; the weight-update pause mode gets its default."""
    if args.max_weight_staleness < 0:
        raise UsageError(f"--max-weight-staleness must be 0 or more, got {args.max_weight_staleness}.")
    if args.rollout_timeout is not None and args.rollout_timeout <= 0:
        raise UsageError(
            f"--rollout-timeout must be a positive number of seconds, got {args.rollout_timeout}."
        )
    for dest in ("partial_rollout", "update_weights_pause_mode"):
        if vars(args)[dest] and not args.async_rollout:
            raise UsageError(
                f"{_flag(dest)} acts on requests that a weight update interrupts, which happens only "
                "with --async; add --async or drop it."
            )
    if args.partial_rollout and args.update_weights_pause_mode == "in_place":
        raise UsageError(
            "--partial-rollout continues requests that a weight update aborts, but "
            "--update-weights-pause-mode in_place aborts none; drop one of them."
        )
    if args.async_rollout and args.update_weights_pause_mode is None:
        args.update_weights_pause_mode = "abort" if args.partial_rollout else "in_place"


def check_layout(args: argparse.Namespace) -> None:
    """A layout of more than one process (or --colocate) runs on Ray: set ``use_ray`` and refuse what the
    trainer ranks and engine actors cannot run. The layout's own arithmetic is checked where Ray starts
    (`miles_core.distributed.placement.Layout`)."""
    if (
        args.colocate
        or args.actor_num_nodes * args.actor_num_gpus_per_node > 1
        or (args.rollout_num_gpus or 0) > 1
    ):
        args.use_ray = True
    if not args.use_ray:
        return
    if args.train_backend != "torch":
        raise UsageError(
            f"--use-ray runs ranks of the built-in trainer, not --train-backend {args.train_backend}; "
            "use --train-backend torch or run single-process."
        )
    if args.rollout_backend not in ("torch", "http"):
        raise UsageError(
            f"--use-ray starts built-in engines (miles serve) as actors, not --rollout-backend "
            f"{args.rollout_backend}; start those servers yourself and pass --rollout-engine-urls with "
            "--rollout-backend http."
        )
    if args.colocate and args.async_rollout:
        raise UsageError(
            "--colocate makes training and rollout take turns on the same devices, so --async cannot "
            "overlap them; drop one of the two."
        )


def validate(args: argparse.Namespace) -> None:
    """Refuse what the core cannot run, each with one sentence naming the flag and the fix."""
    check_layout(args)
    if args.rollout_num_gpus_per_engine != 1:
        raise UsageError(
            f"--rollout-num-gpus-per-engine {args.rollout_num_gpus_per_engine} needs model parallelism in "
            "the engine, which no rollout backend implements; use 1."
        )
    backends = (("rollout_backend", drivers.ROLLOUT_BACKENDS), ("train_backend", drivers.TRAIN_BACKENDS))
    for dest, group in backends:
        names = drivers.available(group)
        if vars(args)[dest] not in names:
            raise UsageError(
                f"unknown {_flag(dest)} {vars(args)[dest]!r}; installed: {', '.join(names) or 'none'}."
            )
    check_parallel_args(args)
    if args.eval_prompt_data is not None and len(args.eval_prompt_data) % 2:
        raise UsageError(
            "--eval-prompt-data takes NAME PATH pairs, e.g. --eval-prompt-data gsm8k test.jsonl."
        )
    check_numbers(args)
    check_async_args(args)
    check_loss_args(args)
    check_algo_args(args)
    check_ppo_args(args)
    check_true_on_policy(args)
    if args.eps_clip_high is None:
        args.eps_clip_high = args.eps_clip
    if args.rm_type and args.custom_rm_path:
        raise UsageError("pass either --rm-type or --custom-rm-path, not both.")
    check_ops_args(args)
    check_agentic_args(args)


def check_run_args(args: argparse.Namespace) -> None:
    """Checks that only a training run needs (not `--help` or `miles plugins`)."""
    replaying = args.load_debug_rollout_data is not None  # saved rollouts: no prompts read, no rewards
    for dest in ("hf_checkpoint", "prompt_data", "rollout_batch_size", "num_rollout"):
        excused = (replaying and dest == "prompt_data") or (dest == "num_rollout" and args.num_epoch)
        if vars(args)[dest] in (None, "") and not excused:
            raise UsageError(f"{_flag(dest)} is required for miles train; see miles train --help.")
    needs_reward = (args.loss_type != "sft_loss" or args.eval_prompt_data) and not replaying  # SFT: none
    if needs_reward and not args.rm_type and not args.custom_rm_path:
        names = drivers.available(drivers.REWARDS)
        rm = f"--rm-type NAME (installed: {', '.join(names)}) or " if names else ""
        raise UsageError(f"no reward: pass {rm}--custom-rm-path file.py.")
    n = args.rollout_batch_size * args.n_samples_per_prompt
    if args.global_batch_size is None:
        steps = args.num_steps_per_rollout or 1
        if n % steps:
            raise UsageError(f"--num-steps-per-rollout {steps} must divide the {n} samples of a rollout.")
        args.global_batch_size = n // steps
    if n % args.global_batch_size:
        raise UsageError(
            f"--global-batch-size {args.global_batch_size} must divide rollout-batch-size x "
            f"n-samples-per-prompt = {n}."
        )
    steps = n // args.global_batch_size
    if args.num_steps_per_rollout not in (None, steps):
        raise UsageError(
            f"--num-steps-per-rollout {args.num_steps_per_rollout} disagrees with --global-batch-size "
            f"{args.global_batch_size} ({steps} steps per rollout); pass only one of them."
        )
    args.num_steps_per_rollout = steps
    if args.global_batch_size % args.micro_batch_size:
        raise UsageError(
            f"--micro-batch-size {args.micro_batch_size} must divide "
            f"--global-batch-size {args.global_batch_size}."
        )
    warn_single_sample_groups(args)


def warn_single_sample_groups(args: argparse.Namespace) -> None:
    """Warn when a group-relative estimator gets one sample per prompt: every advantage is zero."""
    if args.n_samples_per_prompt > 1 or args.disable_rewards_normalization or args.loss_type == "sft_loss":
        return
    # An estimator declares `group_relative = True` when it compares each sample with its group.
    if getattr(drivers.get_estimator(args.advantage_estimator), "group_relative", False):
        log.warning(
            "--advantage-estimator %s with --n-samples-per-prompt 1 compares each sample only with itself, "
            "so every advantage is 0 and nothing trains (grad_norm 0); sample 2 or more per prompt or pass "
            "--disable-rewards-normalization.",
            args.advantage_estimator,
        )
