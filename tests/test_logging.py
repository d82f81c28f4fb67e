"""Tests for miles_core.logging: metrics.jsonl, resume truncation, TensorBoard files, plots, bars, logger."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from miles_core.logging import MetricsLogger, get_logger, plot_curves, progress, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_rows_and_prefix(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"reward_mean": 0.5, "n": 3, "t": torch.tensor(2.0), "skip": "text"}, prefix="rollout/")
        # Each row is on disk right after log() returns (flushed), before close.
        assert _lines(tmp_path / "metrics.jsonl") == [
            {"step": 1, "rollout/reward_mean": 0.5, "rollout/n": 3.0, "rollout/t": 2.0}
        ]
        log.log(2, {"eval/accuracy": 0.25})
    assert _lines(tmp_path / "metrics.jsonl")[1] == {"step": 2, "eval/accuracy": 0.25}


def test_nonfinite_values_are_left_out_and_counted(tmp_path, capsys):
    def strict(line: str) -> dict:
        return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))

    with MetricsLogger(tmp_path) as log:
        row = log.log(1, {"a": float("nan"), "b": 1.0, "c": float("inf"), "d": torch.tensor(float("-inf"))})
        assert row == {"step": 1, "b": 1.0, "metrics/nonfinite_dropped": 3.0}
        log.log(2, {"a": float("nan"), "b": 2.0})
        log.log(3, {"a": 0.5})
    rows = [strict(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "b": 1.0, "metrics/nonfinite_dropped": 3.0},
        {"step": 2, "b": 2.0, "metrics/nonfinite_dropped": 1.0},
        {"step": 3, "a": 0.5},
    ]
    warned = capsys.readouterr().err.splitlines()  # once per key
    assert len(warned) == 3 and warned[0].startswith("[miles] metric a is nan at step 1; left out of metrics")


def test_resume_truncates_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss"')  # the interrupted run died mid-line
    with MetricsLogger(tmp_path, tensorboard=False, resume_from_step=3) as log:
        assert [r["step"] for r in read_metrics(log.path)] == [1, 2]
        log.log(3, {"loss": 30.0})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # A fresh (non-resumed) logger appends.
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(4, {"loss": 4.0})
    assert [r["step"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_tensorboard_event_file(tmp_path):
    log = MetricsLogger(tmp_path / "run")
    log.log(1, {"reward_mean": 0.1}, prefix="rollout/")
    log.log(2, {"reward_mean": 0.3}, prefix="rollout/")
    log.close()
    events = [p for p in (tmp_path / "run" / "tb").iterdir() if p.name.startswith("events.out.tfevents")]
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    scalars = acc.Scalars("rollout/reward_mean")
    assert [(s.step, round(s.value, 5)) for s in scalars] == [(1, 0.1), (2, 0.3)]


def test_plot_curves_writes_png(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 5):
            log.log(step, {"reward_mean": step / 4}, prefix="rollout/")
        log.log(4, {"accuracy": 0.5}, prefix="eval/")
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left behind


def test_plot_curves_without_data(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "other": 1.0}\n')
    for src in (tmp_path / "metrics.jsonl", tmp_path / "missing.jsonl"):
        out = plot_curves(src, tmp_path / "empty.png")
        assert out.read_bytes().startswith(PNG_MAGIC)


def test_progress_env_switch(monkeypatch):
    monkeypatch.setenv("MILES_PROGRESS", "0")
    assert progress(10, "x").disable is True
    monkeypatch.setenv("MILES_PROGRESS", "1")
    bar = progress(10, "x")
    assert bar.disable is False
    bar.close()
    monkeypatch.delenv("MILES_PROGRESS")
    assert progress(10, "x", disable=True).disable is True
    # pytest captures stderr, so it is not a terminal here: bars default to off.
    assert progress(10, "x").disable is True


def test_get_logger_format_and_hierarchy(capsys):
    log = get_logger("miles_core.data.source")
    assert log.name == "miles.miles_core.data.source"
    assert get_logger("miles.loop").name == "miles.loop"
    log.info("loaded %d prompts", 3)
    assert capsys.readouterr().err == "[miles] loaded 3 prompts\n"
    get_logger("again")  # configuring twice must not add a second handler
    get_logger("miles.loop").warning("once")
    assert capsys.readouterr().err == "[miles] once\n"
    ours = [h for h in logging.getLogger("miles").handlers if type(h).__name__ == "_StderrHandler"]
    assert len(ours) == 1  # pytest may attach capture handlers of its own


@pytest.fixture(autouse=True)
def _no_progress_env(monkeypatch):
    monkeypatch.delenv("MILES_PROGRESS", raising=False)
