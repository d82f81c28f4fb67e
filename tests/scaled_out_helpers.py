"""Scaled-out `miles train` runs for the tests: each run is a `miles train` process of its own, which
starts and stops its local Ray cluster on 127.0.0.1 (shared by `test_scaled_out` on CPU, `test_multigpu`
on CUDA and `test_true_on_policy`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def train_argv(
    run: Path, ckpt: Path, prompts: Path, reward: Path, *extra: str, device: str = "cpu"
) -> list[str]:
    argv = ["--hf-checkpoint", str(ckpt), "--prompt-data", str(prompts), "--input-key", "prompt"]
    argv += ["--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2"]
    argv += ["--n-samples-per-prompt", "4", "--rollout-max-response-len", "12", "--lr", "1e-3"]
    argv += ["--custom-rm-path", str(reward), "--micro-batch-size", "2", "--run-dir", str(run)]
    argv += ["--device", device, "--rollout-health-check-interval", "0.5"]
    return argv + list(extra)


def start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``miles train argv`` in a session of its own, output to ``log``; ``env`` is added to this process's
    environment (NCCL's and CUDA's settings pass through as they are)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "miles_core.cli", "train", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def rollouts(run: Path) -> list[dict]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [m for m in rows if "rollout/reward_mean" in m]


def pids(title: str, session: int) -> list[int]:
    """Processes of ``session`` whose command line starts with ``title`` (Ray names an actor's process
    ``ray::Class``). A run that `start` started is the session of its pid, and Ray's processes stay in it,
    also once the run has ended: other runs on the machine (other tests, other users) are left alone."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if not (entry / "cmdline").read_bytes().startswith(title.encode()):
                    continue
                # state, ppid, pgrp, session follow the command name, which is in parentheses
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def wait_for(cond, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out; log tail:\n{log.read_text()[-3000:]}")


def assert_synced(rows: list[dict]) -> None:
    """The engines sampled with the weights the trainer had: with fp32 on both sides the train/rollout
    log-probs agree to float noise (an engine left on old weights differs by ~1e-2 at this lr)."""
    for m in rows:
        assert m["train/train_rollout_logprob_abs_diff"] < 1e-4, m


def run_with_an_engine_killed(
    tmp_path: Path, ckpt: Path, prompts: Path, reward: Path, *, engines: int, device: str = "cpu",
    env: dict[str, str] | None = None, timeout: float = 300,
) -> tuple[list[dict], str]:  # fmt: skip
    """A 4-rollout run of 1 trainer rank and ``engines`` engine actors (on Ray, even 1 + 1) in which one
    engine actor is SIGKILLed once the first rollout is logged; checks that Ray restarted it, that it was
    caught up to the trainer's weights, that the run completed and that its actors stopped with it, and
    returns the rollout rows and the log.

    --true-on-policy-mode makes the catch-up exact: trainer and engines run the same batch-invariant
    kernels, so every rollout's train/rollout log-prob difference is 0.0 exactly when every engine that
    sampled held the trainer's current weights (a restarted engine left on older weights would not)."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    argv = train_argv(
        run, ckpt, prompts, reward, "--num-rollout", "4", "--true-on-policy-mode", device=device
    )
    argv += ["--actor-num-gpus-per-node", "1", "--rollout-num-gpus", str(engines), "--use-ray"]
    proc = start(argv, log, env)
    try:
        # Once the first rollout is logged the engines are up; kill one of them for the next ones.
        wait_for(lambda: (run / "metrics.jsonl").is_file() and rollouts(run), timeout, proc, log)
        victim = wait_for(lambda: pids("ray::EngineActor", proc.pid), 30, proc, log)[0]
        os.kill(victim, signal.SIGKILL)
        assert finish(proc, timeout) == 0, log.read_text()[-3000:]
    finally:
        finish(proc, 0)
    rows = rollouts(run)
    assert len(rows) == 4 and all(m["rollout/num_samples"] == 8 for m in rows), rows
    assert all(m["rollout/generate_failed"] == 0 for m in rows), rows
    assert rows[-1]["rollout/engine_restarts"] >= 1, rows[-1]
    for m in rows:
        assert m["train/train_rollout_logprob_abs_diff"] == 0.0 and m["train/train_rollout_kl"] == 0.0, m
    text = log.read_text()
    assert "died; restarting it" in text and "is back at" in text, text[-3000:]
    assert not pids("ray::", proc.pid)  # every actor stopped with the run
    return rows, text
