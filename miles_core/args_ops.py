"""The `miles train` flags of everyday operations, in slime's names: debug modes (rollout only, train only,
saved rollouts), chat-template and data options, eval configs, W&B. Part of `miles_core.args`; the flags join
the core's families where they belong; `check_ops_args` runs from `miles_core.validate.validate`.
"""

from __future__ import annotations

import argparse
import json

from miles_core.errors import UsageError
from miles_core.logging import get_logger
from miles_core.wandb_sink import check_wandb_args

ON_OFF = argparse.BooleanOptionalAction
log = get_logger(__name__)

# Flags of this module that leave a run's result unchanged (resuming with other values is allowed).
OPS_NEUTRAL = frozenset(
    {
        "save_debug_rollout_data",
        "eval_config",
        "eval_input_key",
        "eval_label_key",
        "start_rollout_id",
        "num_epoch",
        *("use_wandb", "wandb_project", "wandb_group", "wandb_team", "wandb_mode", "wandb_dir"),
        *("wandb_key", "wandb_host", "wandb_run_id", "wandb_random_suffix"),
    }
)


def add_ops(p: argparse.ArgumentParser) -> None:
    """Add the debug family, and this module's flags to the data, rollout, checkpoint and eval families."""
    _add_data(_group(p, "data"))
    _add_rollout(_group(p, "rollout"))
    _add_checkpoint(_group(p, "checkpoint"))
    _add_eval(_group(p, "eval"))
    _add_debug(p)
    _add_wandb(p)


def _group(p: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's argument group called ``title`` (added by `miles_core.args`)."""
    return next(g for g in p._action_groups if g.title == title)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"not JSON ({e}); pass an object such as '{{\"enable_thinking\": false}}'"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text} is not a JSON object; pass one such as '{{\"enable_thinking\": false}}'"
        )
    return value


def _add_data(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--apply-chat-template-kwargs",
        type=_json_object,
        default={},
        help="JSON object of extra chat-template variables, e.g. '{\"enable_thinking\": false}' (Qwen3).",
    )
    g.add_argument(
        "--chat-template-path",
        type=str,
        default=None,
        help="Jinja chat template file to use instead of the tokenizer's (with --apply-chat-template).",
    )
    g.add_argument(
        "--num-epoch",
        type=int,
        default=None,
        help="Passes over --prompt-data instead of --num-rollout: num_rollout = num_epoch x prompts // "
        "rollout_batch_size.",
    )
    g.add_argument(
        "--start-rollout-id",
        type=int,
        default=None,
        help="The first rollout id of the loop (default: the checkpoint's next rollout with --load, else 0).",
    )


def _add_rollout(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--rollout-max-context-len",
        type=int,
        default=None,
        help="Prompt plus response token limit of a sample (a response stops there, truncated); "
        "--rollout-max-prompt-len defaults to it minus 1.",
    )


def _add_checkpoint(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--ref-load",
        type=str,
        default=None,
        help="Weights of the reference model of the KL terms: an HF folder or a --save folder (its newest "
        "checkpoint); default --hf-checkpoint.",
    )


def _add_eval(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--eval-config",
        type=str,
        default=None,
        help="YAML of eval datasets (slime's format: eval: {defaults: {...}, datasets: [{name, path, ...}]}) "
        "instead of --eval-prompt-data.",
    )
    g.add_argument("--eval-input-key", type=str, default=None, help="Default: --input-key.")
    g.add_argument("--eval-label-key", type=str, default=None, help="Default: --label-key.")


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


def _add_wandb(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("wandb (pip install 'miles-core[wandb]')")
    g.add_argument(
        "--use-wandb", action=ON_OFF, default=False, help="Log the metrics to Weights & Biases too."
    )
    g.add_argument("--wandb-project", type=str, default=None, help="W&B project.")
    g.add_argument("--wandb-group", type=str, default=None, help="W&B group (and run name, see below).")
    g.add_argument("--wandb-team", type=str, default=None, help="W&B entity (team or user).")
    g.add_argument(
        "--wandb-mode",
        choices=["online", "offline", "disabled"],
        default=None,
        help="online, offline (written locally for `wandb sync`) or disabled (default: WANDB_MODE, else "
        "online).",
    )
    g.add_argument("--wandb-dir", type=str, default=None, help="Folder of W&B's files (default: --run-dir).")
    g.add_argument("--wandb-key", type=str, default=None, help="API key to log in with (online).")
    g.add_argument("--wandb-host", type=str, default=None, help="W&B server to log in to (online).")
    g.add_argument(
        "--wandb-run-id", type=str, default=None, help="Resume (or create) the W&B run of this id."
    )
    g.add_argument(
        "--disable-wandb-random-suffix",
        dest="wandb_random_suffix",
        action="store_false",
        default=True,
        help="Name the run --wandb-group exactly (by default a random 8-character suffix is added).",
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
    replaying = args.load_debug_rollout_data is not None or args.debug_train_only
    evaluating = bool(args.eval_prompt_data or args.eval_config) and not replaying
    if save is not None and "{rollout_id}" not in save and (args.num_rollout != 1 or evaluating):
        raise UsageError(
            f"--save-debug-rollout-data {save} has no {{rollout_id}}, so each rollout (or evaluation, "
            "eval_<id>) would overwrite the last; put {rollout_id} in the path."
        )
    if args.load_debug_rollout_data is not None:
        if args.debug_rollout_only:
            raise UsageError(
                "--load-debug-rollout-data trains on saved rollouts and --debug-rollout-only never trains; "
                "drop one of them."
            )
        args.debug_train_only = True
        unread = [f for f, v in (("--prompt-data", args.prompt_data), ("--rm-type", args.rm_type),
                                 ("--custom-rm-path", args.custom_rm_path)) if v]  # fmt: skip
        if unread:
            log.info(
                "--load-debug-rollout-data: %s not read (the saved samples carry their prompts and rewards).",
                ", ".join(unread),
            )
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
    if args.debug_train_only and (args.eval_prompt_data or args.eval_config):
        # Not refused: replaying a run means repeating its flags (or its --config), eval ones included.
        flag = "--eval-config" if args.eval_config else "--eval-prompt-data"
        log.info("--debug-train-only starts no rollout engine, so nothing is evaluated (%s not read).", flag)
    if args.debug_rollout_only:
        for dest in ("load", "save", "save_hf"):
            if vars(args)[dest]:
                flag = "--" + dest.replace("_", "-")
                raise UsageError(
                    f"--debug-rollout-only builds no trainer, so there is nothing for {flag} to "
                    f"{'resume' if dest == 'load' else 'write'}; drop {flag}."
                )


def check_data_args(args: argparse.Namespace) -> None:
    """The data, context and reference flags agree; ``--rollout-max-prompt-len`` gets its default."""
    for dest in ("num_epoch", "rollout_max_context_len"):
        if vars(args)[dest] is not None and vars(args)[dest] < 1:
            raise UsageError(f"--{dest.replace('_', '-')} must be at least 1, got {vars(args)[dest]}.")
    if args.start_rollout_id is not None and args.start_rollout_id < 0:
        raise UsageError(f"--start-rollout-id must be 0 or more, got {args.start_rollout_id}.")
    if args.num_epoch is not None and args.num_rollout is not None:
        raise UsageError(
            "--num-epoch sets the number of rollouts, and so does --num-rollout; pass one of them."
        )
    if args.num_epoch is not None and args.load_debug_rollout_data is not None:
        raise UsageError(
            "--num-epoch counts passes over --prompt-data, which --load-debug-rollout-data does not read; "
            "pass --num-rollout instead."
        )
    ctx = args.rollout_max_context_len
    if ctx is not None:
        if ctx < 2:
            raise UsageError(f"--rollout-max-context-len {ctx} leaves no room for a prompt and a response.")
        if args.rollout_max_prompt_len is None:
            args.rollout_max_prompt_len = ctx - 1
        elif args.rollout_max_prompt_len > ctx - 1:
            raise UsageError(
                f"--rollout-max-prompt-len {args.rollout_max_prompt_len} leaves no response token within "
                f"--rollout-max-context-len {ctx}; lower it to at most {ctx - 1}."
            )
    if args.chat_template_path is not None and not args.apply_chat_template:
        raise UsageError(
            "--chat-template-path is read only with --apply-chat-template; add it or drop the path."
        )
    if args.apply_chat_template_kwargs and not args.apply_chat_template:
        raise UsageError(
            "--apply-chat-template-kwargs is read only with --apply-chat-template; add it or drop the kwargs."
        )
    if args.ref_load is not None and not (args.use_kl_loss or args.kl_coef):
        raise UsageError(
            "--ref-load names the reference model of a KL term, and no KL term is on; add --use-kl-loss "
            "(or --kl-coef) or drop --ref-load."
        )
    if args.eval_config is not None and args.eval_prompt_data:
        # As in slime the config wins; not refused, since --eval-prompt-data may come from a --config file.
        log.info("--eval-config names the eval datasets; --eval-prompt-data is not read.")


def check_ops_args(args: argparse.Namespace) -> None:
    """Check this module's flags (one sentence naming the flag and the fix)."""
    check_debug_args(args)
    check_data_args(args)
    check_wandb_args(args)
