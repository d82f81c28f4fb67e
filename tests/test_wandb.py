"""W&B logging: an offline run writes a run folder `wandb sync` takes, holding every logged row; wandb stays
an optional extra that ``import miles_core`` never loads."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_debug_modes import demo_argv, error_of, rows

from miles_core.cli import main


def wandb_records(path: Path) -> list[bytes]:
    """The protobuf records of a ``run-*.wandb`` file: a 7-byte ``:W&B`` header, then 32 KiB blocks of
    chunks (crc u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), LevelDB-log style."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def history_and_run(log_file: Path) -> tuple[dict[int, dict], object]:
    """The history rows (by step) and the run record of a ``run-*.wandb`` file, once complete: W&B's
    service process writes the last records after ``run.finish()`` returns, up to the ``exit`` record."""
    from wandb.proto import wandb_internal_pb2 as pb

    def records() -> list:
        out = []
        for raw in wandb_records(log_file):
            record = pb.Record()
            record.ParseFromString(raw)
            out.append(record)
        return out

    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in records()) and time.monotonic() < deadline:
        time.sleep(0.2)
    history, meta = {}, None
    for record in records():
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # a key with "/" (rollout/reward_mean) is stored split, in nested_key
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = items
        elif kind == "run":
            meta = record.run
    return history, meta


def test_offline_run_writes_a_syncable_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="pip install 'miles-core[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    reward = tmp_path / "reward.py"
    reward.write_text("async def reward(args, sample):\n    return 0.5 * (sample.index % 2)\n")
    run = tmp_path / "run"
    argv = demo_argv(run, reward) + ["--use-wandb", "--wandb-project", "miles-test", "--wandb-group", "g"]
    assert main(argv) == 0
    (folder,) = (run / "wandb").glob("offline-run-*")
    (log_file,) = folder.glob("run-*.wandb")
    history, meta = history_and_run(log_file)
    assert meta.project == "miles-test" and meta.run_group == "g" and meta.display_name.startswith("g_")
    jsonl = {r["step"]: r for r in rows(run)}
    assert sorted(history) == sorted(jsonl) == [1, 2]
    for step, row in jsonl.items():
        diff = {
            k: (v, history[step].get(k)) for k, v in row.items() if k != "step" and history[step].get(k) != v
        }
        assert not diff, diff
    dry = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(folder)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert dry.returncode == 0 and "Would sync 1 run" in dry.stdout + dry.stderr


def test_without_wandb_installed(capsys, tmp_path, monkeypatch):
    import miles_core.wandb_sink as sink

    monkeypatch.setattr(sink.importlib.util, "find_spec", lambda name: None)
    line = error_of(capsys, demo_argv(tmp_path / "r", tmp_path / "rm.py") + ["--use-wandb"])
    assert "needs wandb, which is not installed; pip install 'miles-core[wandb]'" in line


def test_wandb_flags_need_use_wandb(capsys, tmp_path):
    line = error_of(capsys, demo_argv(tmp_path / "r", tmp_path / "rm.py") + ["--wandb-project", "p"])
    assert "--wandb-project is read only with --use-wandb" in line


def test_import_stays_light():
    code = (
        "import sys, miles_core, miles_core.cli, miles_core.loop, miles_core.wandb_sink; "
        "print(sorted(m for m in ('wandb', 'matplotlib', 'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "[]"


def test_wandb_flags_reach_the_run(tmp_path, monkeypatch):
    """--wandb-mode offline (no WANDB_MODE), --wandb-dir, --disable-wandb-random-suffix, --wandb-run-id."""
    pytest.importorskip("wandb", reason="pip install 'miles-core[wandb]'")
    from miles_core.args import parse_args
    from miles_core.wandb_sink import WandbSink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = parse_args(["--use-wandb", "--wandb-mode", "offline", "--wandb-dir", str(tmp_path / "wb"),
                       "--wandb-group", "grp", "--disable-wandb-random-suffix", "--wandb-run-id", "abc123",
                       "--run-dir", str(tmp_path / "run")])  # fmt: skip
    sink = WandbSink(args)
    try:
        assert sink.run.id == "abc123" and sink.run.name == "grp" and sink.run.group == "grp"
        sink.log({"step": 3, "rollout/reward_mean": 0.5})
    finally:
        sink.close()
    (folder,) = (tmp_path / "wb" / "wandb").glob("offline-run-*-abc123")
    assert not (tmp_path / "run").exists()
    history, _ = history_and_run(next(folder.glob("run-*.wandb")))
    assert history == {
        3: {"rollout/reward_mean": 0.5, **{k: v for k, v in history[3].items() if k.startswith("_")}}
    }
