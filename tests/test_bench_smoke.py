"""The benchmarks run on CPU with their small config and print one JSON line with the keys the speed
issue asks for (the numbers themselves are measured on GPU, see bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--preset", "cpu-small", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"')]  # TRL logs Python dicts
    assert len(lines) == 1, out.stdout[-2000:]
    return json.loads(lines[0])


def test_rollout_bench_prints_its_json_line():
    r = _run("rollout.py", "--no-compile", "--compare-moe")
    assert {"device", "miles_tok_s", "hf_tok_s", "ratio", "roof_frac", "moe_decode"} <= r.keys()
    assert r["device"] == "cpu" and r["miles_tok_s"] > 0 and r["hf_tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["miles_tok_s"] / r["hf_tok_s"], rel=1e-2)
    assert 0 < r["roof_frac"] < 1


def test_train_step_bench_prints_its_json_line():
    r = _run("train_step.py", "--steps", "1")
    assert {"device", "tok_s", "mfu"} <= r.keys()
    assert r["tok_s"] > 0 and 0 < r["mfu"] < 1


def test_decode_profile_runs_on_cpu():
    r = _run("decode_profile.py", "--no-compile", "--steps", "1")
    assert r["device"] == "cpu" and r["batch"] > 0


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (pip install trl)")
def test_grpo_vs_trl_bench_prints_its_json_line():
    r = _run("grpo_vs_trl.py")
    assert {"device", "miles_samples_s", "trl_samples_s", "ratio"} <= r.keys()
