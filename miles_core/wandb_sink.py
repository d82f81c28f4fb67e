"""Weights & Biases logging (``--use-wandb``), beside metrics.jsonl and TensorBoard.

`WandbSink` receives every row `MetricsLogger` writes. wandb is an optional extra
(``pip install 'miles-core[wandb]'``) imported only when a run asks for it, so ``import miles_core`` stays
light. Offline (``--wandb-mode offline`` or ``WANDB_MODE=offline``) the run is written under
``<--wandb-dir, default --run-dir>/wandb/offline-run-*`` for ``wandb sync`` later.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import uuid
from typing import Any

from miles_core.errors import UsageError
from miles_core.logging import get_logger

log = get_logger(__name__)

MISSING = "--use-wandb needs wandb, which is not installed; pip install 'miles-core[wandb]'."


def check_wandb_args(args: argparse.Namespace) -> None:
    """wandb is installed when asked for, and the W&B flags are not given without ``--use-wandb``."""
    given = [
        f"--{d.replace('_', '-')}"
        for d in ("wandb_project", "wandb_group", "wandb_team", "wandb_mode", "wandb_dir", "wandb_run_id")
        if vars(args)[d] is not None
    ]
    if not args.use_wandb:
        if given:
            raise UsageError(f"{given[0]} is read only with --use-wandb; add it or drop {given[0]}.")
        return
    if importlib.util.find_spec("wandb") is None:
        raise UsageError(MISSING)


class WandbSink:
    """One W&B run; `log` sends a metrics row at its step."""

    def __init__(self, args: argparse.Namespace) -> None:
        import wandb  # the optional extra, imported only for --use-wandb

        self._wandb = wandb
        mode = args.wandb_mode or os.environ.get("WANDB_MODE") or "online"
        if mode == "online" and args.wandb_key is not None:
            wandb.login(key=args.wandb_key, host=args.wandb_host)
        group = args.wandb_group
        name = f"{group}_{uuid.uuid4().hex[:8]}" if group and args.wandb_random_suffix else group
        folder = args.wandb_dir or args.run_dir
        os.makedirs(folder, exist_ok=True)
        config = json.loads(
            json.dumps({k: v for k, v in vars(args).items() if k != "wandb_key"}, default=str)
        )
        self.run = wandb.init(
            project=args.wandb_project,
            entity=args.wandb_team,
            group=group,
            name=name,
            id=args.wandb_run_id,
            resume="allow" if args.wandb_run_id else None,
            dir=folder,
            mode=mode,
            config=config,
        )
        log.info("W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics row (``row["step"]`` is its x-axis)."""
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def open_wandb(args: argparse.Namespace) -> list[WandbSink]:
    """The run's W&B sink (``--use-wandb``), as a list of `MetricsLogger` sinks (empty without it)."""
    return [WandbSink(args)] if args.use_wandb else []
