"""Which checkpoint a run resumes from, and whether it may.

``--load`` must name a folder that holds a checkpoint, except when it is also ``--save``: then a run
resumes if a checkpoint is there and starts otherwise, and says which. Leftovers of a write cut short
are cleaned from ``--save`` first. A checkpoint stores the run's flags (``args.json``); resuming with a
different value of a flag that alters the run is refused unless ``--allow-changed-args``. The flags in
`RUN_NEUTRAL` may change freely: where outputs go, how long the run is, evaluation, and knobs of speed
and memory that leave the result the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from miles_core.args_ops import OPS_NEUTRAL
from miles_core.errors import UsageError
from miles_core.flags import flag_name
from miles_core.logging import get_logger
from miles_core.train.checkpoint import clean_leftovers, latest_checkpoint, saved_args

log = get_logger(__name__)

RUN_NEUTRAL = frozenset(
    {
        # where things are written, and bookkeeping
        "load", "save", "save_interval", "keep_last_n_checkpoints", "save_hf", "run_dir", "overwrite",
        "allow_changed_args", "config", "model_name", "disable_plugins",
        # length of the run: resuming with a larger --num-rollout extends it
        "num_rollout",
        # evaluation: measures the policy, does not train it
        "eval_interval", "eval_prompt_data", "n_samples_per_eval_prompt", "eval_max_response_len",
        "eval_temperature", "eval_top_p", "eval_top_k", "eval_reward_key",
        # where and how fast: the loss is normalised over the global batch, so micro-batching and packing
        # change the speed and memory, not the update
        "device", "micro_batch_size", "use_dynamic_batch_size", "max_tokens_per_gpu",
        "rollout_max_batch_size", "rollout_cuda_graph", "rollout_compile", "rollout_fused_moe",
        "train_compile", "packed_attention", "recompute_granularity", "recompute_activations",
        "rm_concurrency",
        # the layout: the loss is normalised over the global batch, so how many trainer ranks and engines
        # share it changes the speed, not the update (the sharded optimizer state is resharded on load)
        "use_ray", "ray_address", "actor_num_nodes", "actor_num_gpus_per_node", "rollout_num_gpus",
        "rollout_num_gpus_per_engine", "rollout_num_engines", "colocate", "update_weight_buffer_size",
        "rollout_engine_urls", "rollout_health_check_interval",
    }
)  # fmt: skip

_UNSET = object()


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def changed_args(
    saved: dict[str, Any], args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[str]:
    """``--flag OLD -> NEW`` for each flag outside `RUN_NEUTRAL` whose value differs from ``saved``.

    A flag that exists on one side only (a plugin installed or removed since) counts when it is set:
    to something other than its default now, or to anything but an empty value then.
    """
    current = json.loads(json.dumps(vars(args), default=str))
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out = []
    for dest in sorted(set(saved) | set(current)):
        old, new = saved.get(dest, _UNSET), current.get(dest, _UNSET)
        if dest in RUN_NEUTRAL or dest in OPS_NEUTRAL or old == new:
            continue
        if (
            old is _UNSET
            and dest in actions
            and new == json.loads(json.dumps(actions[dest].default, default=str))
        ):
            continue
        if new is _UNSET and old in (None, False, 0, "", []):
            continue
        name = flag_name(actions[dest]) if dest in actions else "--" + dest.replace("_", "-")
        out.append(f"{name} {_show(old)} -> {_show(new)}")
    return out


def check_args_unchanged(path: Path, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse to resume from ``path`` with other values of flags that alter the run (see the module)."""
    saved = saved_args(path)
    if saved is None:
        log.info("%s has no args.json (saved by an older miles); its flags are not compared", path)
        return
    diffs = changed_args(saved, args, parser)
    if not diffs:
        return
    if args.allow_changed_args:
        log.warning("resuming %s with changed flags (--allow-changed-args): %s", path, ", ".join(diffs))
        return
    raise UsageError(
        f"{path} was saved with other values of flags that alter the run ({', '.join(diffs)}); resume "
        "with the saved values, or pass --allow-changed-args if the change is meant."
    )


def resolve_resume(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    """The checkpoint this run resumes from, or None to start from ``--hf-checkpoint``.

    Cleans ``--save`` of leftovers first; logs a skipped damaged checkpoint and the resume-or-start
    choice; raises `UsageError` for a ``--load`` without a checkpoint or with changed flags.
    """
    if args.save:
        removed = clean_leftovers(args.save)
        if removed:
            log.info(
                "removed leftovers of an interrupted checkpoint write from %s: %s",
                args.save,
                ", ".join(removed),
            )
    if not args.load:
        return None
    load = Path(args.load)
    if load.exists() and not load.is_dir():
        raise UsageError(f"--load {load} is a file; pass the folder that --save wrote checkpoints to.")
    path = latest_checkpoint(load, report=log.warning)
    if path is None:
        if args.save and load.resolve() == Path(args.save).resolve():
            log.info("no checkpoint in %s yet (--load is --save): starting from %s", load, args.hf_checkpoint)
            return None
        what = "does not exist" if not load.exists() else "holds no checkpoint (no iter_* folder)"
        raise UsageError(
            f"--load {load} {what}; pass the folder that --save wrote checkpoints to, or give --load and "
            "--save the same folder to resume when it holds a checkpoint and start otherwise."
        )
    check_args_unchanged(path, args, parser)
    return path
