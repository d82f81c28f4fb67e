"""The `miles` command: `train`, `plugins`, and the tools around a run.

Every user mistake surfaces as `UsageError` and is printed as one line, ``miles: error: ...``, with
exit status 2; a traceback means a bug in miles or a plugin.
"""

from __future__ import annotations

import sys

from miles_core.errors import UsageError

USAGE = """usage: miles COMMAND [flags]

commands:
  train     run GRPO-style RL training (miles train --help lists the flags)
  plugins   list installed plugins, their versions, hooks and whether each is active
  convert   convert an HF checkpoint (the formats installed plugins provide)
  rm-check  score a JSONL of {response, label} rows with a reward (--rm-type NAME --data FILE)
  serve     serve the engine over SGLang's HTTP API (--hf-checkpoint DIR --port N)
  router    balance requests over running engines (--worker-urls URL ... --port N)
"""


def train_main(argv: list[str]) -> int:
    from miles_core.args import check_run_args, parse_args
    from miles_core.plugins import configure_plugins, disabled_from_argv, get_plugin_manager

    pm = get_plugin_manager(disable=disabled_from_argv(argv))
    args = parse_args(argv, pm)
    check_run_args(args)
    active = configure_plugins(pm, args)
    from miles_core.rollout.reward import RewardRunner

    if args.load_debug_rollout_data is None:  # saved rollouts carry their rewards
        RewardRunner(args)  # resolve the reward now: a missing plugin or file fails before any model loads
    from miles_core.logging import get_logger
    from miles_core.loop import run

    on = sorted(name for name, is_on in active.items() if is_on)
    get_logger("miles").info("plugins active: %s", ", ".join(on) or "none")
    summary = run(args, pm)
    if summary["accuracy_before"] is not None and summary["accuracy_after"] is not None:
        print(
            f"held-out accuracy: {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} "
            f"on {summary['num_eval_problems']} problems"
        )
    print(f"done in {summary['wall_s']:.1f} s; metrics, curves.png and summary.json are in {args.run_dir}")
    return 0


def plugins_cmd(argv: list[str]) -> int:
    from miles_core.plugins import plugins_main

    return plugins_main(argv)


def rm_check_cmd(argv: list[str]) -> int:
    from miles_core.rm_check import main as rm_check_main

    return rm_check_main(argv)


def convert_main(argv: list[str]) -> int:
    """`miles convert --hf-checkpoint IN --output OUT --to FORMAT`: plugins do the converting."""
    from pathlib import Path

    from miles_core.flags import ArgumentParser
    from miles_core.plugins import add_plugin_arguments, disabled_from_argv, get_plugin_manager

    pm = get_plugin_manager(disable=disabled_from_argv(argv))
    parser = ArgumentParser(prog="miles convert", description="Convert an HF checkpoint.")
    parser.add_argument("--hf-checkpoint", required=True, help="Folder of the source HF checkpoint.")
    parser.add_argument("--output", required=True, help="Folder to write the converted checkpoint to.")
    parser.add_argument("--to", default=None, help="Target format, as installed plugins define (e.g. fp8).")
    add_plugin_arguments(parser)
    pm.hook.add_convert_arguments(parser=parser)
    args = parser.parse_args(argv)
    if not Path(args.hf_checkpoint, "config.json").is_file():
        raise UsageError(
            f"--hf-checkpoint {args.hf_checkpoint} has no config.json; point it at an HF checkpoint."
        )
    if not pm.hook.convert_checkpoint(args=args, input_dir=args.hf_checkpoint, output_dir=args.output):
        what = f"--to {args.to}" if args.to else "these flags"
        raise UsageError(
            f"no installed plugin converts {what}; `miles plugins` lists the installed plugins (those "
            "with convert_checkpoint convert), and `miles convert --help` their flags."
        )
    print(f"wrote {args.output}")
    return 0


def serve_cmd(argv: list[str]) -> int:
    from miles_core.serve.server import serve_main

    return serve_main(argv)


def router_cmd(argv: list[str]) -> int:
    from miles_core.serve.router import main as router_main

    return router_main(argv)


COMMANDS = {
    "train": train_main,
    "plugins": plugins_cmd,
    "convert": convert_main,
    "rm-check": rm_check_cmd,
    "serve": serve_cmd,
    "router": router_cmd,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"miles: error: unknown command '{command}'; choose one of {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    try:
        return COMMANDS[command](rest)
    except UsageError as e:
        print(f"miles: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "miles: interrupted; resume with the same command (--load) from the last checkpoint.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
