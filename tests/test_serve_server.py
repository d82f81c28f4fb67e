"""`miles serve` against a real server process on 127.0.0.1: every endpoint of the SGLang subset, weights
over HTTP (tensor, disk, distributed) equal an engine built from those weights, routed experts round-trip,
concurrent clients share one batch, bad requests get one-sentence 400s and the server keeps serving."""

from __future__ import annotations

import asyncio
import base64
import pickle
import socket
import threading

import aiohttp
import numpy as np
import pytest
import torch
from conftest import make_checkpoint
from serve_helpers import served

from miles_core.engine import Engine
from miles_core.model import load_model, named_hf_tensors
from miles_core.serve import ipc, weight_sync
from miles_core.serve.protocol import decode_routes, encode_tensors, parse_generate_response

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
SEEDED = {"temperature": 1.0, "max_new_tokens": 12, "sampling_seed": 1234}
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def ckpt_b(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "b", seed=7)


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with served(tiny_ckpt, tmp_path_factory.mktemp("serve")) as s:
        yield s


def local_outputs(ckpt, params, prompts=(PROMPT,), routes=False):
    engine = Engine(load_model(ckpt).eval(), None, max_batch_size=8)
    engine.capture_routes = routes
    return engine.generate_batch([list(p) for p in prompts], params)


def gen(s, params, prompt=PROMPT, **extra):
    code, body = s.post("/generate", {"input_ids": list(prompt), "sampling_params": params, **extra})
    assert code == 200, body
    return body


def test_generate_matches_the_in_process_engine_with_logprobs_and_routes(server, tiny_ckpt):
    body = gen(server, SEEDED, return_logprob=True, return_routed_experts=True, rid="r1")
    out = parse_generate_response(body)
    want = local_outputs(tiny_ckpt, SEEDED, routes=True)[0]
    assert out.output_ids == want.output_ids and out.rid == "r1"
    assert np.allclose(out.log_probs, want.log_probs, atol=1e-5)
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == 4 and meta["completion_tokens"] == len(want.output_ids)
    assert meta["finish_reason"]["type"] in ("stop", "length")
    flat = decode_routes(meta["routed_experts"])
    assert np.array_equal(flat.reshape(want.routed_experts.shape), want.routed_experts)
    assert flat.size == (4 + len(want.output_ids) - 1) * 2 * 2  # rows x layers x topk
    assert "routed_experts" not in gen(server, GREEDY)["meta_info"]  # only when asked


def test_text_input_and_stop_token_ids(server):
    body = gen(server, {**GREEDY, "max_new_tokens": 3}, prompt=[5])
    first = body["output_ids"][0]
    code, stopped = server.post(
        "/generate", {"input_ids": [5], "sampling_params": {**GREEDY, "stop_token_ids": [first]}}
    )
    assert stopped["output_ids"] == [first] and stopped["meta_info"]["finish_reason"]["type"] == "stop"
    code, body = server.post("/generate", {"text": "What is 1+2?", "sampling_params": {"max_new_tokens": 2}})
    assert code == 200 and body["meta_info"]["prompt_tokens"] > 3 and isinstance(body["text"], str)


@pytest.mark.parametrize(
    "body, words",
    [
        ({"sampling_params": {}}, "input_ids"),
        ({"input_ids": []}, "non-empty"),
        ({"input_ids": [1, "x"]}, "integers"),
        ({"input_ids": [10**6]}, "vocabulary"),
        ({"input_ids": [1], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"input_ids": [1], "sampling_params": {"max_new_tokens": 10**5}}, "positions"),
        ({"input_ids": [1], "sampling_params": {"stop": 3}}, "stop"),
        ({"input_ids": [1], "rid": 5}, "rid"),
    ],
)
def test_malformed_requests_get_one_sentence_and_the_server_keeps_serving(server, body, words):
    code, answer = server.post("/generate", body)
    assert code == 400 and words in answer["error"]["message"]
    assert answer["error"]["message"].count(". ") == 0  # one sentence
    assert gen(server, {**GREEDY, "max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1


def test_invalid_json_and_bad_control_bodies(server):
    import urllib.request

    req = urllib.request.Request(
        server.url + "/generate", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and b"not valid JSON" in e.value.read()
    assert server.post("/abort_request", {})[0] == 400
    assert server.post("/pause_generation", {"mode": "retract"})[0] == 400
    assert server.post("/update_weights_from_disk", {"model_path": "/nope"})[0] == 400
    assert server.post("/update_weights_from_tensor", {"serialized_named_tensors": ["!!"]})[0] == 400
    assert server.post("/update_weights_from_distributed", {"group_name": "none"})[0] == 400


def test_info_and_health_endpoints(server):
    info = server.get("/get_model_info")
    assert info["is_generation"] and info["num_experts"] == 8 and info["num_experts_per_tok"] == 2
    sinfo = server.get("/get_server_info")
    assert sinfo["engine"] == "miles" and sinfo["num_running"] == 0 and not sinfo["paused"]
    assert server.get("/health") == {} and server.get("/health_generate") == {}


def test_concurrent_clients_share_one_continuous_batch(server):
    before = server.get("/get_server_info")["decode_steps"]

    async def many():
        async with aiohttp.ClientSession() as s:

            async def one(i):
                body = {"input_ids": [5, 6, i % 7 + 1], "sampling_params": {**GREEDY, "max_new_tokens": 8}}
                async with s.post(server.url + "/generate", json=body) as r:
                    return await r.json()

            return await asyncio.gather(*(one(i) for i in range(32)))

    outs = asyncio.run(many())
    assert all(o["meta_info"]["completion_tokens"] >= 1 for o in outs)
    steps = server.get("/get_server_info")["decode_steps"] - before
    assert steps < 32 * 7 / 4  # one request at a time would take 7 decode steps each


def test_abort_pause_continue_and_client_disconnect(server):
    long = {"temperature": 1.0, "max_new_tokens": 200, "stop_token_ids": []}

    async def flow():
        async with aiohttp.ClientSession() as s:
            body = {"input_ids": [5, 6], "sampling_params": long, "rid": "slow"}
            task = asyncio.ensure_future(s.post(server.url + "/generate", json=body))
            for _ in range(500):  # bounded wait until it runs
                async with s.get(server.url + "/get_server_info") as r:
                    if (await r.json())["num_running"]:
                        break
                await asyncio.sleep(0.01)
            async with s.post(server.url + "/pause_generation", json={"mode": "in_place"}) as r:
                assert (await r.json())["num_aborted"] == 0
            async with s.get(server.url + "/health_generate") as r:
                assert r.status == 503
            async with s.post(server.url + "/continue_generation", json={}) as r:
                assert r.status == 200
            async with s.post(server.url + "/abort_request", json={"rid": "slow"}) as r:
                assert (await r.json())["num_aborted"] == 1
            resp = await task
            return await resp.json()

    out = asyncio.run(flow())
    assert (
        out["meta_info"]["finish_reason"]["type"] == "abort" and out["meta_info"]["completion_tokens"] < 200
    )

    async def disconnect():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
            async with s.post(server.url + "/pause_generation", json={"mode": "in_place"}) as r:
                assert r.status == 200
            with pytest.raises(asyncio.TimeoutError):  # waits, paused, until the client gives up
                await s.post(server.url + "/generate", json={"input_ids": [5], "sampling_params": long})

    asyncio.run(disconnect())
    for _ in range(300):  # the server drops the request of a client that went away, even while paused
        info = server.get("/get_server_info")
        if info["num_running"] + info["num_waiting"] == 0:
            break
        asyncio.run(asyncio.sleep(0.01))
    assert info["num_running"] + info["num_waiting"] == 0
    assert server.post("/continue_generation")[0] == 200


def test_flush_release_and_resume_memory(server):
    assert server.post("/flush_cache")[0] == 200
    assert server.post("/release_memory_occupation")[0] == 200
    assert server.get("/get_server_info")["memory_released"]
    assert server.post("/resume_memory_occupation")[0] == 200
    assert gen(server, {**GREEDY, "max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_weights_over_http_equal_an_engine_built_from_them(server, tiny_ckpt, ckpt_b):
    """Tensor, disk and distributed updates each load checkpoint B (or back A) exactly."""
    want_b = local_outputs(ckpt_b, SEEDED)[0].output_ids
    want_a = local_outputs(tiny_ckpt, SEEDED)[0].output_ids
    assert want_a != want_b
    b_named = list(named_hf_tensors(load_model(ckpt_b)))

    blobs = [encode_tensors(b_named[: len(b_named) // 2]), encode_tensors(b_named[len(b_named) // 2 :])]
    code, r = server.post(
        "/update_weights_from_tensor", {"serialized_named_tensors": blobs, "weight_version": "3"}
    )
    assert code == 200 and r["weight_version"] == "3"
    out = gen(server, SEEDED)
    assert out["output_ids"] == want_b and out["meta_info"]["weight_version"] == "3"

    code, r = server.post("/update_weights_from_disk", {"model_path": str(tiny_ckpt), "weight_version": "4"})
    assert code == 200 and gen(server, SEEDED)["output_ids"] == want_a

    port = _free_port()
    joined = {}
    t = threading.Thread(target=lambda: joined.update(g=weight_sync.join_group("127.0.0.1", port, 0, 2, "w")))
    t.start()
    body = {
        "master_address": "127.0.0.1",
        "master_port": port,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "w",
    }
    assert server.post("/init_weights_update_group", body)[0] == 200
    t.join(60)
    sender = threading.Thread(target=weight_sync.send, args=(joined["g"], [t for _, t in b_named]))
    sender.start()
    body = {**weight_sync.tensor_specs(b_named), "group_name": "w", "weight_version": "5"}
    code, r = server.post("/update_weights_from_distributed", body)
    sender.join(60)
    assert code == 200 and r["weight_version"] == "5"
    out = gen(server, SEEDED)
    assert out["output_ids"] == want_b and out["meta_info"]["output_token_weight_versions"] == [5] * len(
        want_b
    )
    assert server.post("/destroy_weights_update_group", {"group_name": "w"})[0] == 200
    assert (
        server.post(
            "/update_weights_from_tensor",
            {"serialized_named_tensors": [encode_tensors([("nope", torch.zeros(1))])]},
        )[0]
        == 400
    )


def test_weights_handed_over_in_shared_memory_load_exactly(server, tiny_ckpt, ckpt_b):
    """The colocated path: SGLang's pickle of tensors, CPU storages in shared memory, loads checkpoint B
    exactly; a pickle that is not (name, tensor) pairs is a 400 and the server keeps serving."""
    want_b = local_outputs(ckpt_b, SEEDED)[0].output_ids
    b_named = list(named_hf_tensors(load_model(ckpt_b)))
    blob = ipc.share_tensors(b_named)
    assert all(t.is_shared() for _, t in b_named)  # handed over, not copied into the request
    code, r = server.post(
        "/update_weights_from_tensor", {"serialized_named_tensors": [blob], "weight_version": "6"}
    )
    assert code == 200 and r["weight_version"] == "6"
    assert gen(server, SEEDED)["output_ids"] == want_b
    bad = base64.b64encode(pickle.dumps({"not": "pairs"})).decode()
    code, r = server.post("/update_weights_from_tensor", {"serialized_named_tensors": [bad]})
    assert code == 400 and "pairs" in r["error"]["message"]
    assert (
        server.post("/update_weights_from_disk", {"model_path": str(tiny_ckpt), "weight_version": "7"})[0]
        == 200
    )


def test_pickles_are_taken_only_from_this_machine():
    assert ipc.is_local_peer("127.0.0.1") and ipc.is_local_peer("::1")
    assert not ipc.is_local_peer("10.0.0.5") and not ipc.is_local_peer(None) and not ipc.is_local_peer("x")


def test_context_length_sizes_the_cache_up_front_and_bounds_requests(tiny_ckpt, tmp_path):
    with served(tiny_ckpt, tmp_path, "--context-length", "64", "--rollout-max-batch-size", "4") as s:
        code, body = s.post("/generate", {"input_ids": [5] * 60, "sampling_params": {"max_new_tokens": 8}})
        assert code == 400 and "64 positions" in body["error"]["message"]
        assert gen(s, {**GREEDY, "max_new_tokens": 8})["meta_info"]["completion_tokens"] == 8


@pytest.mark.parametrize(
    "flags, dtype",
    [
        ([], torch.float32),
        (["--rollout-dtype", "bfloat16"], torch.bfloat16),
        (["--rollout-dtype", "bfloat16", "--true-on-policy-mode"], torch.float32),  # the trainer's dtype
        (["--true-on-policy-mode", "--bf16"], torch.bfloat16),
    ],
)
def test_the_served_engine_takes_the_runs_rollout_dtype(tiny_ckpt, flags, dtype):
    from miles_core.args import parse_args
    from miles_core.serve.server import add_serve_arguments, build_server

    args = parse_args(
        ["--hf-checkpoint", str(tiny_ckpt), "--device", "cpu", *flags], None, add_serve_arguments
    )
    assert build_server(args, None).engine.dtype == dtype
