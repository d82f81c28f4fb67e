"""The HTTP rollout client (`--rollout-backend http`) against real `miles serve` processes on 127.0.0.1:
generation on one and two engines equals the in-process engine's, weights pushed in each update mode give
the tokens of an engine built from them, routed experts round-trip, and an engine killed mid-rollout is
retried elsewhere, restarted and caught up."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Site, make_checkpoint
from serve_helpers import Served, served, start_server, stop_server

from miles_core import cli, drivers
from miles_core.args import parse_args
from miles_core.engine import Engine
from miles_core.errors import UsageError
from miles_core.model import load_model, named_hf_tensors
from miles_core.protocols import RolloutBackend
from miles_core.serve import launch
from miles_core.serve.client import HttpEngine, SGLangEngine
from miles_core.serve.protocol import decode_routes
from miles_core.serve.remote import get_json
from miles_core.types import RolloutOptions

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [5, 6, 7, 8]]
SEEDED = {"temperature": 1.0, "max_new_tokens": 10}


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "b", seed=7)


@pytest.fixture(scope="module")
def two_servers(tiny_ckpt, tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = tmp_path_factory.mktemp("servers")
    with served(tiny_ckpt, work) as a, served(tiny_ckpt, work) as b:
        yield a, b


@pytest.fixture
def servers(two_servers, tiny_ckpt):
    """The two servers, back on the start weights as version 0."""
    for s in two_servers:
        code, body = s.post("/update_weights_from_disk", {"model_path": str(tiny_ckpt), "weight_version": 0})
        assert code == 200, body
    return two_servers


def run_args(tmp_path: Path, ckpt: Path, *flags: str):
    argv = ["--hf-checkpoint", str(ckpt), "--prompt-data", "unused.jsonl", "--rollout-batch-size", "4"]
    argv += ["--num-rollout", "1", "--device", "cpu", "--run-dir", str(tmp_path / "run"), *flags]
    return parse_args(argv)


def client_over(tmp_path, ckpt, servers: tuple[Served, ...], *flags: str) -> HttpEngine:
    urls = [s.url for s in servers]
    return HttpEngine.from_args(run_args(tmp_path, ckpt, "--rollout-engine-urls", *urls, *flags), None, None)


def generate_all(client: HttpEngine, prompts, params, seeds=None):
    async def all_():
        return await asyncio.gather(
            *(
                client.generate(p, params if seeds is None else {**params, "sampling_seed": s})
                for p, s in zip(prompts, seeds or [None] * len(prompts))
            )
        )

    return asyncio.run(all_())


def local_engine(ckpt, routes=False) -> Engine:
    engine = Engine(load_model(ckpt).eval(), None, max_batch_size=8)
    engine.capture_routes = routes
    return engine


def local_seeded(ckpt, prompts, seeds, routes=False):
    """The in-process engine's answers, one explicit sampling seed a prompt."""
    engine = local_engine(ckpt, routes)

    async def all_():
        return await asyncio.gather(
            *(engine.generate(p, {**SEEDED, "sampling_seed": s}) for p, s in zip(prompts, seeds))
        )

    return asyncio.run(all_())


def same_tokens(got, want):
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    for g, w in zip(got, want):
        assert np.allclose(g.log_probs, w.log_probs, atol=1e-5)


def test_generate_on_one_and_two_engines_equals_the_in_process_engine(servers, tiny_ckpt, tmp_path):
    local = local_engine(tiny_ckpt)
    local.reseed(7)
    want = local.generate_batch(PROMPTS, SEEDED)
    before = [s.get("/get_server_info")["generated_tokens"] for s in servers]
    for engines in (servers[:1], servers):
        with client_over(tmp_path, tiny_ckpt, engines) as client:
            assert isinstance(client, RolloutBackend)
            client.reseed(7)  # the client draws each request's seed as the engine would
            got = generate_all(client, PROMPTS, SEEDED)
            same_tokens(got, want)
            assert client.generated_tokens == sum(len(o.output_ids) for o in want)
            assert all(o.weight_version == 0 for o in got)
    after = [s.get("/get_server_info")["generated_tokens"] for s in servers]
    assert (
        after[1] > before[1] and after[0] - before[0] > after[1] - before[1]
    )  # #1 served only the 2nd round


@pytest.mark.parametrize("mode", ["tensor", "disk", "distributed"])
def test_weights_pushed_in_each_mode_give_the_tokens_of_those_weights(
    servers, tiny_ckpt, ckpt_b, tmp_path, mode
):
    seeds = [11, 12, 13, 14]
    want = local_seeded(ckpt_b, PROMPTS, seeds)
    new = load_model(ckpt_b)
    with client_over(tmp_path, tiny_ckpt, servers, "--update-weights-mode", mode) as client:
        for version in (3, 4):  # twice: a distributed group is reused, a disk folder replaced
            client.update_weights(named_hf_tensors(new), version=version)
            assert client.weight_version == version
            got = generate_all(client, PROMPTS, SEEDED, seeds)
            assert all(o.weight_version == version for o in got)
            same_tokens(got, want)
        assert [s.get("/get_server_info")["weight_version"] for s in servers] == ["4", "4"]
    folders = sorted(p.name for p in (tmp_path / "run" / "rollout_weights").glob("v*"))
    assert folders == (["v4"] if mode == "disk" else [])


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.02)


def test_pause_survives_a_weight_update_and_abort_returns_the_tokens_so_far(
    servers, tiny_ckpt, ckpt_b, tmp_path
):
    server = servers[0]

    def waiting() -> int:
        info = server.get("/get_server_info")
        return info["num_waiting"] + info["num_running"]

    with client_over(tmp_path, tiny_ckpt, servers[:1]) as client:
        assert client.pause_generation("in_place") == 0
        results: list = []
        worker = threading.Thread(
            target=lambda: results.extend(generate_all(client, PROMPTS[:1], SEEDED, [9]))
        )
        worker.start()
        wait_for(lambda: waiting() == 1, "the request did not reach the engine")
        client.update_weights(named_hf_tensors(load_model(ckpt_b)), version=5)
        assert waiting() == 1 and not results  # still paused: the caller continues
        client.continue_generation()
        worker.join(30)
        same_tokens(results, local_seeded(ckpt_b, PROMPTS[:1], [9]))
        assert results[0].weight_version == 5

        client.pause_generation("in_place")
        long = {"temperature": 1.0, "max_new_tokens": 100, "sampling_seed": 1}

        async def one():
            return await client.generate(PROMPTS[0], long, rid="long-one")

        aborted: list = []
        worker = threading.Thread(target=lambda: aborted.append(asyncio.run(one())))
        worker.start()
        wait_for(lambda: waiting() == 1, "the request did not reach the engine")
        assert client.abort("long-one") == 1 and client.abort("no-such-request") == 0
        worker.join(30)
        client.continue_generation()
    assert aborted[0].finish_reason == "abort" and len(aborted[0].output_ids) < 100


def test_routed_experts_round_trip(servers, tiny_ckpt, tmp_path):
    want = local_seeded(tiny_ckpt, PROMPTS[:1], [5], routes=True)[0]
    with client_over(tmp_path, tiny_ckpt, servers[:1]) as client:
        client.set_rollout_options(RolloutOptions(capture_routes=True))
        got = generate_all(client, PROMPTS[:1], SEEDED, [5])[0]
        client.set_rollout_options(RolloutOptions(capture_routes=False))
        assert generate_all(client, PROMPTS[:1], SEEDED, [5])[0].routed_experts is None
    assert got.output_ids == want.output_ids
    routes = decode_routes(got.routed_experts).reshape(want.routed_experts.shape)
    assert routes.shape == (len(PROMPTS[0]) + len(want.output_ids) - 1, 2, 2)
    assert np.array_equal(routes, want.routed_experts)


@pytest.mark.parametrize("mode", ["distributed", "disk"])
def test_killed_engine_is_retried_restarted_and_caught_up(tiny_ckpt, ckpt_b, tmp_path, mode):
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
        client.update_weights(named_hf_tensors(load_model(ckpt_b)), version=1)
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
        want = local_seeded(ckpt_b, prompts, seeds)
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


def test_external_engine_back_after_a_crash_gets_the_current_weights(tiny_ckpt, ckpt_b, tmp_path):
    """An engine given by address that dies and comes back on its port is caught up before it serves;
    a request sent while it is down waits for it."""
    first = start_server(tiny_ckpt, tmp_path / "a")
    port = first.url.rsplit(":", 1)[1]
    client = client_over(tmp_path, tiny_ckpt, (first,), "--rollout-health-check-interval", "0.3")
    again = None
    try:
        client.update_weights(named_hf_tensors(load_model(ckpt_b)), version=2)
        first.kill()
        results: list = []
        waiting = threading.Thread(
            target=lambda: results.extend(generate_all(client, PROMPTS[:1], SEEDED, [3]))
        )
        waiting.start()
        again = start_server(tiny_ckpt, tmp_path / "a", port=int(port))  # starts on version 0
        waiting.join(60)
        assert not waiting.is_alive() and again.get("/get_server_info")["weight_version"] == "2"
        same_tokens(results, local_seeded(ckpt_b, PROMPTS[:1], [3]))
        assert results[0].weight_version == 2
    finally:
        client.close()
        stop_server(first)
        if again is not None:
            stop_server(again)


def test_serving_flags_are_checked_in_one_sentence(tmp_path, tiny_ckpt):
    cases = [
        (["--rollout-num-engines", "0"], "--rollout-num-engines 0 must be at least 1"),
        (["--sglang-router-ip", "127.0.0.1"], "go together"),
        (
            ["--sglang-router-ip", "h", "--sglang-router-port", "1", "--rollout-engine-urls", "http://h:2"],
            "one of",
        ),
        (["--sglang-router-ip", "127.0.0.1", "--sglang-router-port", "9"], "did not list its workers"),
    ]
    for flags, message in cases:
        with pytest.raises(UsageError, match=message):
            HttpEngine.from_args(run_args(tmp_path, tiny_ckpt, *flags), None, None)
    with pytest.raises(UsageError, match=r"read only by --rollout-backend sglang"):
        run_args(tmp_path, tiny_ckpt, "--sglang-mem-fraction-static", "0.8")


@pytest.fixture
def backends_installed(site):
    """The `http` and `sglang` entry points, as the installed distribution declares them."""
    group = {"http": "miles_core.serve.client:HttpEngine", "sglang": "miles_core.serve.client:SGLangEngine"}
    site.dist("miles-serve-backends", "0.0.0", {"miles.rollout_backends": group})
    return site


def test_sglang_flags_pass_through_and_a_missing_sglang_is_one_sentence(
    backends_installed, tmp_path, tiny_ckpt
):
    args = run_args(tmp_path, tiny_ckpt, "--rollout-backend", "sglang", "--sglang-mem-fraction-static", "0.7",
                    "--sglang-enable-return-routed-experts", "--sglang-router-port", "8", "--sglang-tp=2",
                    "--sglang-router-ip", "h")  # fmt: skip
    argv, url, _ = launch.sglang_command(args, str(tiny_ckpt))
    assert argv[1:5] == ["-m", "sglang.launch_server", "--model-path", str(tiny_ckpt)]
    assert argv[-4:] == ["--mem-fraction-static", "0.7", "--enable-return-routed-experts", "--tp=2"]
    assert url == f"http://127.0.0.1:{argv[argv.index('--port') + 1]}" and "--router-ip" not in argv
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    args = run_args(tmp_path, tiny_ckpt, "--rollout-backend", "sglang")
    with pytest.raises(
        UsageError, match=r'^--rollout-backend sglang needs SGLang.*pip install "sglang\[all\]"'
    ):
        drivers.get_rollout_backend("sglang").from_args(args, None, None)
    with pytest.raises(UsageError, match="tensor sends safetensors"):
        SGLangEngine.from_args(run_args(tmp_path, tiny_ckpt, "--update-weights-mode", "tensor"), None, None)


def _pid_of(marker: str) -> int | None:
    """The process whose command line holds ``marker`` (a local engine, by its port file)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_miles_train_on_two_http_engines_survives_a_killed_engine(
    tiny_ckpt, prompts_file, reward_file, tmp_path
):
    """`miles train --rollout-backend http --rollout-num-engines 2`, one engine SIGKILLed mid-rollout: the
    run finishes with every group complete, and no engine outlives it."""
    site = tmp_path / "site"
    site.mkdir()
    group = {"http": "miles_core.serve.client:HttpEngine"}
    Site(site).dist("miles-serve-backends", "0.0.0", {"miles.rollout_backends": group})
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
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(site), *sys.path]))
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
                    os.kill(_pid_of(str(port_file)), signal.SIGKILL)
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
        assert _pid_of(str(port_file)) is None
        if port_file.is_file():
            assert not launch.answers_health(f"http://127.0.0.1:{port_file.read_text().strip()}", timeout=2)


def test_a_run_over_http_samples_and_learns_as_the_in_process_run(
    backends_installed, tiny_ckpt, prompts_file, reward_file, tmp_path
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
        pid = _pid_of(str(tmp_path / "http" / "engines" / "port-0"))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
    assert len(runs["http"]) == 2 and all(len(m) == len(COMPARED) for m in runs["http"])
    for a, b in zip(runs["torch"], runs["http"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


COMPARED = ("reward_mean", "response_len_mean", "truncated_frac", "pg_loss", "train_rollout_logprob_abs_diff")
