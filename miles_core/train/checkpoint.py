"""Resumable checkpoints: ``<save>/iter_XXXXXXX/`` plus ``latest_checkpointed_iteration.txt``.

Each checkpoint folder holds the policy as an HF checkpoint (``model/``), the optimizer state
(``trainer.pt``, or ``optimizer/`` sharded by the trainer ranks of a scaled-out run, which
`torch.distributed.checkpoint` reshards to another number of ranks), the loop state (next rollout, data
position), the RNG states and the run's flags (``args.json``), written atomically: a checkpoint is
complete or absent, and the pointer file moves only after the folder is in place. Reading picks the
newest checkpoint whose files all open, so one damaged after the fact (a truncated copy, a full disk)
gives way to the one before it. A write cut short leaves only dot-named leftovers, which
`clean_leftovers` removes at the next start.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles_core.atomic import atomic_dir, atomic_write_text
from miles_core.errors import UsageError
from miles_core.model.hf_io import load_config, safetensors_problem, weight_files

POINTER = "latest_checkpointed_iteration.txt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Temporary names of atomic writes in the save folder (`atomic.py`): ``.iter_0000003.x8f2k.tmp``,
# ``.iter_0000003.old`` (the folder being replaced), ``.latest_checkpointed_iteration.txt.x8f2k.tmp``.
_LEFTOVER_RE = re.compile(r"^\.(iter_\d{7}|latest_checkpointed_iteration\.txt)\..*\.tmp$")
_OLD_RE = re.compile(r"^\.(iter_\d{7})\.old$")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain JSON data (no pickle needed to read them back)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    save_dir: str | Path,
    rollout_id: int,
    trainer: Any,
    loop_state: dict,
    tokenizer_src: str | None,
    run_args: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write the checkpoint taken after rollout ``rollout_id`` and point ``latest`` at it.

    :param trainer: the train backend (``protocols.TrainBackend``): its ``save_model`` writes ``model/``
        and its ``state_dict`` goes to ``trainer.pt``.
    :param run_args: the run's flags (``vars(args)``), stored as ``args.json``.
    :param keep_last: afterwards delete all but the newest ``keep_last`` checkpoints (None keeps all).
    """
    save_dir = Path(save_dir)
    final = save_dir / f"iter_{rollout_id:07d}"
    with atomic_dir(final) as tmp:
        trainer.save_model(tmp / "model", tokenizer_src)
        save_state = getattr(trainer, "save_state", None)
        if save_state is not None:  # trainer ranks: each writes its shard under ``optimizer/``
            save_state(tmp)
        else:
            torch.save(trainer.state_dict(), tmp / "trainer.pt")
        (tmp / "rng.json").write_text(json.dumps(rng_state()))
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=2, sort_keys=True))
        if run_args is not None:
            (tmp / "args.json").write_text(json.dumps(run_args, indent=2, sort_keys=True, default=str))
    atomic_write_text(save_dir / POINTER, f"{rollout_id}\n")
    if keep_last is not None:
        for old in checkpoints(save_dir)[keep_last:]:
            # Renamed first, so a deletion cut short leaves a leftover, never a half checkpoint.
            doomed = old.with_name(f".{old.name}.deleted.tmp")
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    return final


def checkpoints(folder: str | Path) -> list[Path]:
    """The ``iter_XXXXXXX`` folders under ``folder``, newest first (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _ITER_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def clean_leftovers(save_dir: str | Path) -> list[str]:
    """Remove what a killed checkpoint write left in ``save_dir``; returns the names removed.

    A checkpoint moved aside to be replaced (``.iter_X.old``) goes back into place if the write that
    replaced it never finished.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    removed = []
    for entry in sorted(save_dir.iterdir()):
        old = _OLD_RE.match(entry.name)
        if old and not (save_dir / old.group(1)).exists():
            os.replace(entry, save_dir / old.group(1))
        elif old or _LEFTOVER_RE.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry.name)
    return removed


def _first_sentence(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(". ")[0].rstrip(".") or type(err).__name__


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, naming the file; None if it can.

    Reads the JSON files, opens ``trainer.pt`` (memory-mapped: its index, not its tensors) and the
    headers of the model's config and safetensors, which catches truncated and garbled files.
    """
    for name in ("loop_state.json", "rng.json", "args.json"):
        file = path / name
        if not file.is_file():
            if name == "args.json":  # written by every save, but absent from older checkpoints
                continue
            return f"{name} is missing"
        try:
            data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return f"{name} is truncated or corrupt (not valid JSON)"
        if not isinstance(data, dict) or (name == "loop_state.json" and "next_rollout" not in data):
            return f"{name} is truncated or corrupt (not the expected object)"
    if is_sharded(path):
        from miles_core.distributed.trainer import state_problem

        problem = state_problem(path)
        if problem:
            return problem
    elif not (path / "trainer.pt").is_file():
        return "trainer.pt is missing"
    else:
        try:
            torch.load(path / "trainer.pt", map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch reports a damaged zip archive as RuntimeError, pickle errors vary
            return f"trainer.pt is truncated or corrupt ({_first_sentence(err)})"
    try:
        load_config(path / "model")
        files = weight_files(path / "model")
    except UsageError as err:
        return f"model/ is incomplete ({_first_sentence(err)})"
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            return f"model/{f.name} is truncated or corrupt ({problem})"
    return None


def latest_checkpoint(
    load_dir: str | Path | None, report: Callable[[str], None] | None = None
) -> Path | None:
    """The newest usable checkpoint under ``load_dir``, or None if it holds none.

    A newer checkpoint that cannot be read is skipped; ``report`` (e.g. a logger's ``warning``) is told
    which, why, and what is used instead. When every checkpoint is damaged, `UsageError` names the
    newest one's problem.
    """
    if not load_dir:
        return None
    found = checkpoints(load_dir)
    skipped: list[str] = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped and report is not None:
                report(f"{'; '.join(skipped)}; resuming from {path} instead.")
            return path
        skipped.append(f"checkpoint {path} is unusable: {problem}")
    if skipped:
        raise UsageError(
            f"no usable checkpoint in {load_dir}: {skipped[0]}; delete the damaged iter_* folders to "
            "start over, or restore them."
        )
    return None


def start_weights(args: argparse.Namespace) -> str:
    """Where a run's policy weights come from: the ``model/`` folder of the newest usable checkpoint
    under ``--load`` when there is one (a resumed run), else ``--hf-checkpoint``."""
    resume = latest_checkpoint(args.load)
    return str(resume / "model") if resume else args.hf_checkpoint


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint's trainer state was written sharded by trainer ranks (``optimizer/``)."""
    return (path / "optimizer").is_dir()


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """Read ``(trainer_state, loop_state)`` of a checkpoint and restore the RNG states. A sharded trainer
    state is not read here: ``{"sharded": folder}`` tells the trainer ranks where to load it from."""
    if is_sharded(path):
        trainer_state: dict = {"sharded": str(path)}
    else:
        trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    set_rng_state(json.loads((path / "rng.json").read_text()))
    loop_state = json.loads((path / "loop_state.json").read_text())
    return trainer_state, loop_state


def saved_args(path: Path) -> dict[str, Any] | None:
    """The flags a checkpoint was saved with (its ``args.json``), or None for an older checkpoint."""
    file = path / "args.json"
    return json.loads(file.read_text()) if file.is_file() else None
