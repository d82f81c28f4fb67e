"""`miles train` scaled out on a real local Ray cluster (on CPU the layout flags count processes): trainer
ranks (FSDP2 over gloo) and `miles serve` engine actors, disaggregated and colocated; a checkpoint written
by 2 ranks resumes on 1; an engine actor SIGKILLed mid-run is restarted, caught up to the trainer's
weights, and the run completes; a trainer rank SIGKILLed ends the run with one sentence naming the rank
and the command that resumes it. Each run is a `miles train` process of its own, which starts and stops
its Ray cluster (`scaled_out_helpers`; `test_multigpu` runs the engine restart on GPUs)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from scaled_out_helpers import (
    assert_synced,
    finish,
    pids,
    rollouts,
    run_with_an_engine_killed,
    start,
    train_argv,
    wait_for,
)

from miles_core.distributed.group import resume_command

pytest.importorskip("ray")


def test_two_ranks_and_two_engines_train_then_resume_on_one_rank(
    tiny_ckpt, prompts_file, reward_file, tmp_path
):
    run, save, log = tmp_path / "run", tmp_path / "save", tmp_path / "train.log"
    layout = ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2", "--save", str(save)]
    argv = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", "2", *layout)
    assert finish(start(argv, log)) == 0, log.read_text()[-3000:]
    rows = rollouts(run)
    assert len(rows) == 2 and all(m["rollout/num_samples"] == 8 for m in rows)
    assert_synced(rows)
    ckpt = save / "iter_0000002"
    assert (ckpt / "optimizer" / ".metadata").is_file() and (ckpt / "model" / "config.json").is_file()
    assert not (ckpt / "trainer.pt").exists()
    assert "2 trainer ranks + 2 rollout engines, disaggregated" in log.read_text()

    # The same run, one rank and one engine now: the sharded optimizer state is resharded by DCP.
    layout = ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1", "--use-ray"]
    argv = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", "3", *layout)
    argv += ["--save", str(save), "--load", str(save)]
    assert finish(start(argv, log)) == 0, log.read_text()[-3000:]
    rows = rollouts(run)
    assert [m["step"] for m in rows][-1] == 3 and (save / "iter_0000003" / "optimizer").is_dir()
    assert "resumed from" in log.read_text()


def test_colocated_ranks_take_turns_with_their_engines(tiny_ckpt, prompts_file, reward_file, tmp_path):
    run, log = tmp_path / "run", tmp_path / "train.log"
    argv = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", "2")
    argv += ["--actor-num-gpus-per-node", "2", "--colocate"]
    proc = start(argv, log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    rows = rollouts(run)
    assert len(rows) == 2 and all(m["rollout/num_samples"] == 8 for m in rows)
    assert_synced(rows)  # each rank handed its engine the weights in shared memory
    assert "colocated" in log.read_text()
    assert not pids("ray::", proc.pid) and (run / "final_hf" / "config.json").is_file()


@pytest.mark.parametrize("engines", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_engine_actor_killed_mid_run_is_restarted_and_caught_up(
    tiny_ckpt, prompts_file, reward_file, tmp_path, engines
):
    """With 2 engines the other one serves meanwhile; with 1, rollouts wait for the restarted one."""
    run_with_an_engine_killed(tmp_path, tiny_ckpt, prompts_file, reward_file, engines=engines)


def test_a_dead_trainer_rank_ends_the_run_naming_it_and_how_to_resume(
    tiny_ckpt, prompts_file, reward_file, tmp_path
):
    run, save, log = tmp_path / "run", tmp_path / "save", tmp_path / "train.log"
    argv = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", "50")
    argv += ["--actor-num-gpus-per-node", "2", "--save", str(save), "--save-interval", "1"]
    proc = start(argv, log)
    try:
        wait_for(lambda: (save / "latest_checkpointed_iteration.txt").is_file(), 240, proc, log)
        victim = wait_for(lambda: sorted(pids("ray::TrainRank", proc.pid)), 30, proc, log)[-1]
        os.kill(victim, signal.SIGKILL)
        assert finish(proc, 120) == 2, log.read_text()[-3000:]
    finally:
        finish(proc, 0)
    text = log.read_text()
    line = next(x for x in text.splitlines() if "trainer rank" in x and "died" in x)
    assert f"--load {save}" in line and "miles train" in line, line
    assert not pids("ray::", proc.pid)
    # The command it names resumes the run (made one rollout longer than the last checkpoint here).
    done = int((save / "latest_checkpointed_iteration.txt").read_text())
    resumed = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", str(done + 1))
    resumed += ["--actor-num-gpus-per-node", "2", "--save", str(save), "--load", str(save)]
    assert finish(start(resumed, log)) == 0, log.read_text()[-3000:]
    assert f"at rollout {done}" in log.read_text() and rollouts(run)[-1]["step"] == done + 1


def test_resume_command_replaces_load(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/x/bin/miles", "train", "--config", "a b.yaml", "--load", "old"])

    class A:
        save = "/ck"

    assert resume_command(A) == "miles train --config 'a b.yaml' --load /ck"


def demo_argv(run: Path, rollouts_: int) -> list[str]:
    from conftest import REPO

    demo = REPO / "examples"
    argv = ["--config", str(demo / "demo.yaml"), "--run-dir", str(run), "--num-rollout", str(rollouts_)]
    argv += ["--eval-interval", str(rollouts_), "--save-interval", "1000"]
    argv += ["--hf-checkpoint", str(demo / "arith" / "checkpoint")]
    argv += ["--prompt-data", str(demo / "arith" / "data" / "train.jsonl")]
    return argv + ["--eval-prompt-data", "arith", str(demo / "arith" / "data" / "test.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2"],
        ["--actor-num-gpus-per-node", "2", "--colocate"],
    ],
    ids=["disaggregated", "colocated"],
)
def test_demo_learns_scaled_out(tmp_path, layout):
    """The demo's first 50 rollouts with 2 trainer ranks and 2 engines lift held-out accuracy as the
    single-process demo does (its first 50 rollouts: 0.301 -> 0.7-0.8)."""
    run, log = tmp_path / "demo", tmp_path / "train.log"
    assert finish(start([*demo_argv(run, 50), "--device", "cpu", *layout], log), 1800) == 0, log.read_text()[
        -3000:
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.3, summary
