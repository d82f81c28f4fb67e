"""Faults of engines behind the HTTP rollout client, with real `miles serve` processes killed by SIGKILL:
requests in flight are retried on another engine, a local engine is restarted and caught up to the
current weights (distributed and disk updates), an engine given by address is caught up when it comes
back, and a `miles train` run finishes with every group complete and leaves no engine behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from serve_client_helpers import (
    PROMPTS,
    SEEDED,
    client_over,
    generate_all,
    local_seeded,
    pid_of,
    run_args,
    same_tokens,
)
from serve_helpers import Served, start_server, stop_server

from miles_core import cli
from miles_core.model import load_model, named_hf_tensors
from miles_core.serve import launch
from miles_core.serve.client import HttpEngine
from miles_core.serve.remote import get_json


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    """Engine processes the client starts use one thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.mark.parametrize("mode", ["distributed", "disk"])
def test_killed_engine_is_retried_restarted_and_caught_up(tiny_ckpt, tiny_ckpt_b, tmp_path, mode):
    flags = [
        "--rollout-num-engines",
        "2",
        "--rollout-health-check-interval",
        "0.3",
        "--update-weights-mode",
        mode,
    ]
    args = run_args(tmp_path, tiny_ckpt, *flags)
    client = HttpEngine.from_args(args, None, None)
    try:
        client.update_weights(named_hf_tensors(load_model(tiny_ckpt_b)), version=1)
        first = client.fleet.engines[0]
        victim = Served(first.proc, first.url, first.log_path)
        victim.post("/pause_generation", {"mode": "in_place"})  # its requests stay in flight until killed
        seeds = list(range(100, 110))
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(seeds))]
        results: list = []
        worker = threading.Thread(target=lambda: results.extend(generate_all(client, prompts, SEEDED, seeds)))
        worker.start()
        deadline = time.monotonic() + 60
        while sum(victim.get("/get_server_info")[k] for k in ("num_waiting", "num_running")) < 2:
            assert time.monotonic() < deadline, "no request reached engine #0"
            time.sleep(0.05)
        os.kill(first.proc.pid, signal.SIGKILL)
        worker.join(120)
        assert not worker.is_alive()
        want = local_seeded(tiny_ckpt_b, prompts, seeds)
        same_tokens(results, want)  # each request answered once, in full, under the current weights
        assert all(o.weight_version == 1 for o in results)
        while client.metrics()["engine_restarts"] < 1:
            assert time.monotonic() < deadline + 120, "the killed engine was not restarted"
            time.sleep(0.1)
        m = client.metrics()
        assert m["engine_restarts"] == 1 and m["retries"] >= 2
        back = Served(first.proc, first.url, first.log_path)
        assert back.url != victim.url and back.get("/get_server_info")["weight_version"] == "1"
        while len(client.pool.healthy) < 2:
            assert time.monotonic() < deadline + 180
            time.sleep(0.05)
        request = {"input_ids": prompts[0], "sampling_params": {**SEEDED, "sampling_seed": 100}}
        code, body = back.post("/generate", request)
        assert code == 200 and body["output_ids"] == want[0].output_ids
    finally:
        client.close()
    assert all(e.proc.poll() is not None for e in client.fleet.engines)


def test_external_engine_back_after_a_crash_gets_the_current_weights(tiny_ckpt, tiny_ckpt_b, tmp_path):
    """An engine given by address that dies and comes back on its port is caught up before it serves;
    a request sent while it is down waits for it."""
    first = start_server(tiny_ckpt, tmp_path / "a")
    port = first.url.rsplit(":", 1)[1]
    client = client_over(tmp_path, tiny_ckpt, (first,), "--rollout-health-check-interval", "0.3")
    again = None
    try:
        client.update_weights(named_hf_tensors(load_model(tiny_ckpt_b)), version=2)
        first.kill()
        results: list = []
        waiting = threading.Thread(
            target=lambda: results.extend(generate_all(client, PROMPTS[:1], SEEDED, [3]))
        )
        waiting.start()
        again = start_server(tiny_ckpt, tmp_path / "a", port=int(port))  # starts on version 0
        waiting.join(60)
        assert not waiting.is_alive() and again.get("/get_server_info")["weight_version"] == "2"
        same_tokens(results, local_seeded(tiny_ckpt_b, PROMPTS[:1], [3]))
        assert results[0].weight_version == 2
    finally:
        client.close()
        stop_server(first)
        if again is not None:
            stop_server(again)


def test_miles_train_on_two_http_engines_survives_a_killed_engine(
    tiny_ckpt, prompts_file, reward_file, tmp_path
):
    """`miles train --rollout-backend http --rollout-num-engines 2`, one engine SIGKILLed mid-rollout: the
    run finishes with every group complete, and no engine outlives it."""
    run = tmp_path / "run"
    argv = ["--hf-checkpoint", str(tiny_ckpt), "--prompt-data", str(prompts_file), "--input-key", "prompt"]
    argv += ["--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2"]
    argv += ["--n-samples-per-prompt", "4", "--num-rollout", "4", "--rollout-max-response-len", "32"]
    argv += ["--custom-rm-path", str(reward_file), "--micro-batch-size", "4", "--run-dir", str(run)]
    argv += [
        "--rollout-backend",
        "http",
        "--rollout-num-engines",
        "2",
        "--rollout-health-check-interval",
        "0.3",
    ]
    argv += ["--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    log = tmp_path / "train.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "miles_core.cli", "train", *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        port_file = run / "engines" / "port-0"
        deadline = time.monotonic() + 180
        killed = False
        while proc.poll() is None and time.monotonic() < deadline and not killed:
            with contextlib.suppress(OSError, ValueError):  # not up yet
                url = f"http://127.0.0.1:{port_file.read_text().strip()}"
                if get_json(url + "/get_server_info", timeout=2)["num_running"] > 0:
                    os.kill(pid_of(str(port_file)), signal.SIGKILL)
                    killed = True
            time.sleep(0.02)
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert killed, "no rollout ran on engine #0"
    rollouts = [
        m
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "rollout/reward_mean" in m
    ]
    assert len(rollouts) == 4
    assert all(m["rollout/num_samples"] == 8 and m["rollout/generate_failed"] == 0 for m in rollouts)
    assert (run / "engines" / "engine-0.log").read_text().count("\n--- ") == 1  # restarted once
    for i in range(2):  # every engine, the restarted one included, stopped with the run
        port_file = run / "engines" / f"port-{i}"
        assert pid_of(str(port_file)) is None
        if port_file.is_file():
            assert not launch.answers_health(f"http://127.0.0.1:{port_file.read_text().strip()}", timeout=2)


def test_a_run_over_http_samples_and_learns_as_the_in_process_run(
    serving_backends, tiny_ckpt, prompts_file, reward_file, tmp_path
):
    """The client draws each request's sampling seed as the engine does, so the same flags give the same
    samples, rewards and losses over HTTP as in-process."""
    argv = ["train", "--hf-checkpoint", str(tiny_ckpt), "--prompt-data", str(prompts_file), "--input-key"]
    argv += ["prompt", "--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2"]
    argv += ["--n-samples-per-prompt", "4", "--num-rollout", "2", "--rollout-max-response-len", "8"]
    argv += [
        "--custom-rm-path",
        str(reward_file),
        "--micro-batch-size",
        "4",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
    ]
    runs = {}
    try:
        for backend in ("torch", "http"):
            run = tmp_path / backend
            assert cli.main([*argv, "--run-dir", str(run), "--rollout-backend", backend]) == 0
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            runs[backend] = [{k: v for k, v in m.items() if k.split("/")[-1] in COMPARED} for m in lines]
    finally:  # the loop may not close its backend: stop the engine it started
        pid = pid_of(str(tmp_path / "http" / "engines" / "port-0"))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    assert len(runs["http"]) == 2 and all(len(m) == len(COMPARED) for m in runs["http"])
    for a, b in zip(runs["torch"], runs["http"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


COMPARED = ("reward_mean", "response_len_mean", "truncated_frac", "pg_loss", "train_rollout_logprob_abs_diff")
