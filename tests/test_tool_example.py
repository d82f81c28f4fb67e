"""examples/tool end to end on CPU: the example's SFT teaches the demo checkpoint to call the Python tool
(partly), then GRPO with the ``tool_call`` generate function makes it call the tool more often.

Not (yet) checked: that held-out accuracy rises. In 12 rollouts it does not, measurably (0.230 -> 0.234 at
temperature 0.7); the SFT model's remaining errors are miscopied operands inside the call, which need more
RL than fits a CI test (see examples/tool/README.md)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from test_tool_call import agentic  # noqa: F401 (the entry-point fixture)

from miles_core.cli import main

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tool"


@pytest.mark.slow
def test_sft_then_grpo_learns_to_use_the_tool(tmp_path, monkeypatch, agentic):  # noqa: F811
    torch.set_num_threads(1)
    ckpt = tmp_path / "sft"
    monkeypatch.setattr(sys, "argv", ["sft.py", "--out", str(ckpt)])
    runpy.run_path(str(EXAMPLE / "sft.py"), run_name="__main__")
    monkeypatch.chdir(REPO)  # the config names the data relative to the repository
    run_dir = tmp_path / "run"
    argv = ["train", "--config", str(EXAMPLE / "grpo.yaml"), "--hf-checkpoint", str(ckpt), "--run-dir",
            str(run_dir), "--device", "cpu", "--num-rollout", "6", "--eval-interval", "6"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/arith/accuracy" in r]
    rollouts = [r for r in rows if "rollout/accuracy" in r]
    first, last = evals[0], evals[-1]
    # The tool was called and its output read: every rollout has tool turns, and no generate call failed.
    assert all(r["rollout/tool_use_frac"] > 0 for r in rollouts)
    assert all(r["rollout/generate_failed"] == 0 for r in rollouts)
    # GRPO: the tool pays (direct answers mostly skip carries), so the policy calls it more often, on the
    # held-out problems as in its rollouts (measured: 0.78 -> 0.98 held out).
    assert last["eval/arith/tool_use_frac"] > first["eval/arith/tool_use_frac"] + 0.1, (first, last)
    assert rollouts[-1]["rollout/tool_use_frac"] > rollouts[0]["rollout/tool_use_frac"] + 0.05, rollouts
    assert last["eval/arith/accuracy"] > 0.1  # it still answers (the tool output is copied into \boxed{})
