"""The `miles train` flags of everyday operations, in slime's names: debug modes (rollout only, train only,
saved rollouts). Part of `miles_core.args`; `check_ops_args` runs from `miles_core.validate.validate`.
"""

from __future__ import annotations

import argparse

from miles_core.errors import UsageError

ON_OFF = argparse.BooleanOptionalAction

# Flags of this module that leave a run's result unchanged (resuming with other values is allowed).
OPS_NEUTRAL = frozenset({"save_debug_rollout_data"})


def add_ops(p: argparse.ArgumentParser) -> None:
    """Add the debug family."""
    _add_debug(p)


def _add_debug(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("debug")
    g.add_argument(
        "--debug-rollout-only",
        action=ON_OFF,
        default=False,
        help="Generate (and evaluate) rollouts without training: no trainer is built and the policy stays "
        "at --hf-checkpoint's weights.",
    )
    g.add_argument(
        "--debug-train-only",
        action=ON_OFF,
        default=False,
        help="Train without a rollout engine, on the rollouts of --load-debug-rollout-data (which implies "
        "it); no evaluation.",
    )
    g.add_argument(
        "--save-debug-rollout-data",
        type=str,
        default=None,
        help="Write each rollout's samples (after rewards) to this .pt path; {rollout_id} in it is replaced "
        "by the rollout's id (needed with more than one rollout).",
    )
    g.add_argument(
        "--load-debug-rollout-data",
        type=str,
        default=None,
        help="Train on the rollouts that --save-debug-rollout-data wrote (the same path with "
        "{rollout_id}; without it one file serves every rollout) instead of generating them; the same "
        "flags train to the same weights.",
    )


def _check_template(flag: str, path: str) -> None:
    try:
        path.format(rollout_id=0)
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(
            f"{flag} {path}: only the placeholder {{rollout_id}} may appear in braces ({e!r}); fix the path."
        ) from None


def check_debug_args(args: argparse.Namespace) -> None:
    """The debug modes agree with each other and with the layout; ``--load-debug-rollout-data`` implies
    ``--debug-train-only``."""
    for flag, path in (
        ("--save-debug-rollout-data", args.save_debug_rollout_data),
        ("--load-debug-rollout-data", args.load_debug_rollout_data),
    ):
        if path is not None:
            _check_template(flag, path)
    save = args.save_debug_rollout_data
    if save is not None and "{rollout_id}" not in save and (args.num_rollout or 0) > 1:
        raise UsageError(
            f"--save-debug-rollout-data {save} has no {{rollout_id}}, so each of the {args.num_rollout} "
            "rollouts would overwrite the last; put {rollout_id} in the path."
        )
    if args.load_debug_rollout_data is not None:
        if args.debug_rollout_only:
            raise UsageError(
                "--load-debug-rollout-data trains on saved rollouts and --debug-rollout-only never trains; "
                "drop one of them."
            )
        args.debug_train_only = True
    if args.debug_rollout_only and args.debug_train_only:
        raise UsageError("--debug-rollout-only and --debug-train-only exclude each other; pass one of them.")
    if args.debug_train_only and args.load_debug_rollout_data is None:
        raise UsageError(
            "--debug-train-only starts no rollout engine, so it trains only on saved rollouts; add "
            "--load-debug-rollout-data PATH (written by --save-debug-rollout-data)."
        )
    mode = "--debug-rollout-only" if args.debug_rollout_only else "--debug-train-only"
    if not (args.debug_rollout_only or args.debug_train_only):
        return
    if args.use_ray:
        raise UsageError(f"{mode} runs single-process; drop --use-ray and the multi-process layout flags.")
    if args.async_rollout:
        raise UsageError(f"{mode} leaves nothing for --async to overlap; drop --async.")
    if args.debug_train_only and args.eval_prompt_data:
        raise UsageError(
            "--debug-train-only starts no rollout engine to evaluate with; drop --eval-prompt-data."
        )
    if args.debug_rollout_only:
        for dest in ("load", "save", "save_hf"):
            if vars(args)[dest]:
                flag = "--" + dest.replace("_", "-")
                raise UsageError(
                    f"--debug-rollout-only builds no trainer, so there is nothing for {flag} to "
                    f"{'resume' if dest == 'load' else 'write'}; drop {flag}."
                )


def check_ops_args(args: argparse.Namespace) -> None:
    """Check this module's flags (one sentence naming the flag and the fix)."""
    check_debug_args(args)
