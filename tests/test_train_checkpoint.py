"""Resumable checkpoints written to disk and read back: the RNG streams, trainer and loop state, weights."""

from __future__ import annotations

import random

import numpy as np
import torch

from miles_core.model import load_model, save_model
from miles_core.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _draws() -> list:
    """The next values of the Python, NumPy and torch global generators (gaussians included, whose
    generators may hold a cached second value)."""
    return [
        [random.random() for _ in range(3)],
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.randn()),
        torch.rand(3).tolist(),
        torch.randn(3).tolist(),
    ]


class _Backend:
    """The two methods of a train backend a checkpoint reads (protocols.TrainBackend)."""

    def __init__(self, model, state: dict) -> None:
        self.model, self.state = model, state

    def save_model(self, path, tokenizer_src) -> None:
        save_model(self.model, path, tokenizer_src=tokenizer_src)

    def state_dict(self) -> dict:
        return self.state


def test_load_restores_rng_streams_and_state_of_save_time(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()  # mid-stream, with a cached gaussian in Python's and NumPy's generators
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    trainer_state = {"step": 6, "optimizer": {"lr": 1e-3}}
    loop_state = {"next_rollout": 3, "data": {"epoch": 0, "offset": 6}}
    path = save_checkpoint(tmp_path, 3, _Backend(model, trainer_state), loop_state, str(tiny_ckpt))
    expected = _draws()

    random.seed(99)  # every stream somewhere else
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draws() != expected
    assert latest_checkpoint(tmp_path) == path
    got_trainer, got_loop = load_checkpoint(path)
    assert _draws() == expected
    assert got_trainer == trainer_state and got_loop == loop_state
    saved = load_model(path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
