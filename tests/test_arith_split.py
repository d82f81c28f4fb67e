"""The demo's held-out arithmetic problems share no operand pair, in either order, with its training data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ARITH = Path(__file__).resolve().parent.parent / "examples" / "arith"


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("arith_task", ARITH / "task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pairs(task, rows: list[dict]) -> set[tuple[int, int]]:
    out = set()
    for r in rows:
        a, _, b = task.operands(r["prompt"])
        out.add(task.pair_key(a, b))
    return out


@pytest.fixture(scope="module")
def generated(task, tmp_path_factory) -> dict[str, list[dict]]:
    """What make_checkpoint.py generates (sft.jsonl is not shipped, so the test writes it again)."""
    out = tmp_path_factory.mktemp("arith")
    task.generate(out, seed=0)
    return {name: load(out / f"{name}.jsonl") for name in ("sft", "train", "test")}


def test_shipped_data_is_what_the_generator_writes(generated) -> None:
    for name in ("train", "test"):
        assert load(ARITH / "data" / f"{name}.jsonl") == generated[name], name
    assert len(generated["test"]) == 256


def test_held_out_operand_pairs_are_unseen_in_training(task, generated) -> None:
    test = pairs(task, load(ARITH / "data" / "test.jsonl"))
    train = pairs(task, load(ARITH / "data" / "train.jsonl"))
    sft = pairs(task, generated["sft"])
    assert test and train and sft
    assert not test & train, sorted(test & train)[:10]
    assert not test & sft, sorted(test & sft)[:10]


def test_split_ignores_operand_order(task) -> None:
    for a in range(10, 100):
        for b in range(10, 100):
            assert task.split_of(a, b) == task.split_of(b, a)
    assert task.operands(task.question_text("47-19")) == (47, "-", 19)
