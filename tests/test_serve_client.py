"""The HTTP rollout client (`--rollout-backend http`) against real `miles serve` processes on 127.0.0.1:
generation on one and two engines equals the in-process engine's, weights pushed in each update mode give
the tokens of an engine built from them, a caller's pause and abort, routed experts round-trip, and the
serving flags (SGLang's passed through, a missing SGLang in one sentence). Faults: test_serve_faults.py."""

from __future__ import annotations

import asyncio
import importlib.util
import threading

import numpy as np
import pytest
from serve_client_helpers import (
    PROMPTS,
    SEEDED,
    client_over,
    generate_all,
    local_engine,
    local_seeded,
    run_args,
    same_tokens,
    wait_for,
)
from serve_helpers import served_many

from miles_core import drivers
from miles_core.errors import UsageError
from miles_core.model import load_model, named_hf_tensors
from miles_core.protocols import RolloutBackend
from miles_core.serve import launch
from miles_core.serve.client import HttpEngine, SGLangEngine
from miles_core.serve.protocol import decode_routes
from miles_core.types import RolloutOptions


@pytest.fixture(autouse=True)
def one_thread_engines(monkeypatch):
    """Engine processes the client starts use one thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def two_servers(tiny_ckpt, tmp_path_factory):
    with served_many(tiny_ckpt, tmp_path_factory.mktemp("servers"), 2) as both:  # their loads overlap
        yield tuple(both)


@pytest.fixture
def servers(two_servers, tiny_ckpt):
    """The two servers, back on the start weights as version 0."""
    for s in two_servers:
        code, body = s.post("/update_weights_from_disk", {"model_path": str(tiny_ckpt), "weight_version": 0})
        assert code == 200, body
    return two_servers


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
    servers, tiny_ckpt, tiny_ckpt_b, tmp_path, mode
):
    seeds = [11, 12, 13, 14]
    want = local_seeded(tiny_ckpt_b, PROMPTS, seeds)
    new = load_model(tiny_ckpt_b)
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


def test_pause_survives_a_weight_update_and_abort_returns_the_tokens_so_far(
    servers, tiny_ckpt, tiny_ckpt_b, tmp_path
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
        client.update_weights(named_hf_tensors(load_model(tiny_ckpt_b)), version=5)
        assert waiting() == 1 and not results  # still paused: the caller continues
        client.continue_generation()
        worker.join(30)
        same_tokens(results, local_seeded(tiny_ckpt_b, PROMPTS[:1], [9]))
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


def test_sglang_flags_pass_through_and_a_missing_sglang_is_one_sentence(
    serving_backends, tmp_path, tiny_ckpt
):
    args = run_args(tmp_path, tiny_ckpt, "--rollout-backend", "sglang", "--sglang-mem-fraction-static", "0.7",
                    "--sglang-enable-return-routed-experts", "--sglang-router-port", "8", "--sglang-tp=2",
                    "--sglang-router-ip", "h")  # fmt: skip
    argv, url, _ = launch.sglang_command(args, str(tiny_ckpt), index=1)
    assert argv[1:5] == ["-m", "sglang.launch_server", "--model-path", str(tiny_ckpt)]
    assert argv[-6:] == ["--mem-fraction-static", "0.7", "--enable-return-routed-experts", "--tp=2"] + [
        "--base-gpu-id",
        "2",  # engine 1 of tensor-parallel size 2
    ]
    assert url == f"http://127.0.0.1:{argv[argv.index('--port') + 1]}" and "--router-ip" not in argv
    assert SGLangEngine.ranks_per_engine(args) == 2
    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    args = run_args(tmp_path, tiny_ckpt, "--rollout-backend", "sglang")
    with pytest.raises(
        UsageError, match=r'^--rollout-backend sglang needs SGLang.*pip install "sglang\[all\]"'
    ):
        drivers.get_rollout_backend("sglang").from_args(args, None, None)
    with pytest.raises(UsageError, match="tensor sends safetensors"):
        SGLangEngine.from_args(run_args(tmp_path, tiny_ckpt, "--update-weights-mode", "tensor"), None, None)


@pytest.mark.slow
def test_demo_learns_over_two_http_engines(tmp_path):
    """The demo's first 50 rollouts over `--rollout-backend http --rollout-num-engines 2` lift held-out
    accuracy as the in-process demo does (the full 150-rollout demo: 0.301 -> 0.871 either way)."""
    import json

    from conftest import REPO

    from miles_core.cli import main

    demo = REPO / "examples"
    run = tmp_path / "demo"
    argv = ["train", "--config", str(demo / "demo.yaml"), "--run-dir", str(run), "--num-rollout", "50"]
    argv += ["--rollout-backend", "http", "--rollout-num-engines", "2"]
    argv += ["--eval-interval", "50", "--save-interval", "1000"]
    argv += ["--hf-checkpoint", str(demo / "arith" / "checkpoint")]
    argv += ["--prompt-data", str(demo / "arith" / "data" / "train.jsonl")]
    argv += ["--eval-prompt-data", "arith", str(demo / "arith" / "data" / "test.jsonl")]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.15
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("rollout/engine_restarts", 0) == 0 for r in rows)
