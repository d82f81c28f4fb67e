"""Resumable checkpoints: ``<save>/iter_XXXXXXX/`` plus ``latest_checkpointed_iteration.txt``.

Each checkpoint folder holds the policy as an HF checkpoint (``model/``), the optimizer state, the
loop state (next rollout, data position) and the RNG states, written atomically: a checkpoint is
complete or absent, and the pointer file moves only after the folder is in place.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from miles_core.atomic import atomic_dir, atomic_write_text
from miles_core.types import UsageError

POINTER = "latest_checkpointed_iteration.txt"


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
    save_dir: str | Path, rollout_id: int, trainer: Any, loop_state: dict, tokenizer_src: str | None
) -> Path:
    """Write the checkpoint taken after rollout ``rollout_id`` and point ``latest`` at it.

    :param trainer: the train backend (``protocols.TrainBackend``): its ``save_model`` writes ``model/``
        and its ``state_dict`` goes to ``trainer.pt``.
    """
    save_dir = Path(save_dir)
    final = save_dir / f"iter_{rollout_id:07d}"
    with atomic_dir(final) as tmp:
        trainer.save_model(tmp / "model", tokenizer_src)
        torch.save(trainer.state_dict(), tmp / "trainer.pt")
        (tmp / "rng.json").write_text(json.dumps(rng_state()))
        (tmp / "loop_state.json").write_text(json.dumps(loop_state, indent=2, sort_keys=True))
    atomic_write_text(save_dir / POINTER, f"{rollout_id}\n")
    return final


def latest_checkpoint(load_dir: str | Path | None) -> Path | None:
    """The newest complete checkpoint under ``load_dir``, or None if there is none yet."""
    if not load_dir:
        return None
    pointer = Path(load_dir) / POINTER
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    try:
        path = Path(load_dir) / f"iter_{int(text):07d}"
    except ValueError:
        raise UsageError(f"{pointer} holds '{text}', not an iteration number; fix or delete it.") from None
    if not (path / "loop_state.json").is_file():
        raise UsageError(
            f"{pointer} points at {path}, which is missing or incomplete; delete the pointer "
            "file to start over or restore the folder."
        )
    return path


def start_weights(args: argparse.Namespace) -> str:
    """Where a run's policy weights come from: the ``model/`` folder of the newest complete checkpoint
    under ``--load`` when there is one (a resumed run), else ``--hf-checkpoint``."""
    resume = latest_checkpoint(args.load)
    return str(resume / "model") if resume else args.hf_checkpoint


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """Read ``(trainer_state, loop_state)`` of a checkpoint and restore the RNG states."""
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    set_rng_state(json.loads((path / "rng.json").read_text()))
    loop_state = json.loads((path / "loop_state.json").read_text())
    return trainer_state, loop_state
