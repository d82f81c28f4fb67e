"""The worker pool and `miles router` against real `miles serve` processes on loopback.

Two servers start once for the module; the fault test starts (and SIGKILLs) its own. A server paused
with ``/pause_generation {"mode": "in_place"}`` holds a request in flight for as long as a test needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from serve_helpers import http_json, serve_env, served_many, start_server, stop_server

from miles_core.serve.pool import WorkerError, WorkerPool
from miles_core.serve.router import RouterThread

BODY = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "temperature": 1.0}}


@pytest.fixture(scope="module")
def engines(tiny_ckpt, tmp_path_factory):
    with served_many(tiny_ckpt, tmp_path_factory.mktemp("engines"), 2) as servers:
        yield [s.url for s in servers]


@pytest.fixture
def router():
    threads: list[RouterThread] = []

    def start(urls, **pool_kwargs) -> tuple[str, RouterThread]:
        t = RouterThread(urls, health_check_interval=0.2, **pool_kwargs)
        threads.append(t)
        return t.start(), t

    yield start
    for t in threads:
        t.stop()


def generated_tokens(url: str) -> int:
    status, info = http_json("GET", url + "/get_server_info")
    assert status == 200
    return info["generated_tokens"]


def served(pool: WorkerPool) -> list[int]:
    return [w["served"] for w in pool.workers()]


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_pool_spreads_concurrent_requests_over_both_engines_in_each_loop(engines):
    pool = WorkerPool(engines, health_check_interval=0.2)
    before = [generated_tokens(u) for u in engines]

    async def rollout() -> list[dict]:
        return await asyncio.gather(*(pool.generate(BODY) for _ in range(16)))

    for k in (1, 2):  # one asyncio.run per rollout, as the rollout manager does: the pool follows the loop
        outs = asyncio.run(rollout())
        assert all(1 <= len(o["output_ids"]) <= 4 for o in outs)
        assert served(pool) == [8 * k, 8 * k]  # all 16 are in flight at once: least-in-flight alternates
        assert pool._state.session.closed  # asyncio.run's shutdown closed the loop's session
    assert all(g > b for g, b in zip([generated_tokens(u) for u in engines], before))
    assert pool.retries == 0


def test_least_in_flight_picks_the_idle_engine(engines):
    a, b = engines
    pool = WorkerPool([a, b], health_check_interval=0.2)

    async def run() -> None:
        held = asyncio.create_task(pool.generate(BODY))  # a tie: goes to a, which holds it (paused)
        await asyncio.sleep(0.2)
        assert [w["in_flight"] for w in pool.workers()] == [1, 0]
        for _ in range(3):  # round-robin would send the second of these to a, where it would hang
            await asyncio.wait_for(pool.generate(BODY), 10)
        assert served(pool) == [0, 3]
        http_json("POST", a + "/continue_generation")
        await asyncio.wait_for(held, 30)
        assert served(pool) == [1, 3]

    assert http_json("POST", a + "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        asyncio.run(run())
    finally:
        http_json("POST", a + "/continue_generation")


def test_a_4xx_passes_through_and_is_not_retried(engines, router):
    pool = WorkerPool(engines, health_check_interval=None)
    with pytest.raises(WorkerError) as err:
        asyncio.run(pool.generate({"input_ids": [], "sampling_params": {}}))
    assert err.value.status == 400 and "input_ids must be a non-empty list" in err.value.message
    assert pool.retries == 0 and served(pool) == [1, 0]

    url, thread = router(engines)
    status, answer = http_json("POST", url + "/generate", {"input_ids": [1], "sampling_params": {"top_p": 7}})
    assert status == 400 and "sampling_params.top_p=7" in answer["error"]["message"]
    assert thread.pool.retries == 0 and sum(served(thread.pool)) == 1


def test_router_add_list_remove_and_generate(engines, router):
    a, b = engines
    url, thread = router([a])
    assert http_json("GET", url + "/list_workers")[1]["urls"] == [a]
    assert http_json("POST", f"{url}/add_worker?url={b}")[1]["urls"] == [a, b]
    status, answer = http_json("POST", url + "/add_worker", {"url": b + "/"})
    assert status == 400 and "already in the pool" in answer["error"]["message"]

    async def many(n: int) -> list[dict]:
        async with aiohttp.ClientSession() as s:

            async def one() -> dict:
                async with s.post(url + "/generate", json=BODY) as r:
                    assert r.status == 200
                    return await r.json()

            return await asyncio.gather(*(one() for _ in range(n)))

    outs = asyncio.run(many(8))
    assert all(o["meta_info"]["finish_reason"]["type"] in ("stop", "length") for o in outs)
    on_a, on_b = served(thread.pool)
    assert on_a > 0 and on_b > 0 and on_a + on_b == 8

    assert http_json("POST", url + "/remove_worker", {"url": b})[1]["urls"] == [a]
    asyncio.run(many(4))
    assert served(thread.pool) == [on_a + 4]
    status, answer = http_json("POST", f"{url}/remove_worker?url={b}")
    assert status == 400 and "not in the pool" in answer["error"]["message"]


def test_router_broadcasts_control_and_reports_workers(engines, router):
    url, _ = router(engines)
    status, answer = http_json("POST", url + "/pause_generation", {"mode": "in_place"})
    try:
        assert status == 200 and [w["url"] for w in answer["workers"]] == engines
        assert all(http_json("GET", u + "/get_server_info")[1]["paused"] for u in engines)
    finally:
        assert http_json("POST", url + "/continue_generation")[0] == 200
    assert not any(http_json("GET", u + "/get_server_info")[1]["paused"] for u in engines)
    assert http_json("POST", url + "/abort_request", {"abort_all": True})[0] == 200
    assert http_json("GET", url + "/flush_cache")[0] == 200
    status, answer = http_json("POST", url + "/pause_generation", {"mode": "sideways"})
    assert status == 400 and "sideways" in answer["error"]["message"]  # each worker's 400, passed on
    status, info = http_json("GET", url + "/get_server_info")
    assert status == 200 and "generated_tokens" in info and [w["url"] for w in info["workers"]] == engines
    assert http_json("GET", url + "/get_model_info")[1]["num_hidden_layers"] == 2


def test_bad_router_requests_get_400_and_the_router_keeps_serving(engines, router):
    url, _ = router(engines)
    cases = [
        ("/generate", b"{not json", "not valid JSON"),
        ("/generate", b"[1, 2]", "must be a JSON object"),
        ("/generate", b"", "send a JSON object with input_ids"),
        ("/add_worker", b"", "send the worker address"),
        ("/add_worker?url=ftp://x:1", b"", "is not http://host:port"),
        ("/add_worker?url=http://h:port", b"", "has a bad port"),
    ]
    for path, body, fragment in cases:
        status, answer = http_json("POST", url + path, body)
        assert status == 400 and fragment in answer["error"]["message"], (path, answer)
    assert http_json("GET", url + "/health")[0] == 200
    assert http_json("POST", url + "/generate", BODY)[0] == 200


def test_engine_killed_mid_request_is_retried_and_revived_by_health_checks(
    tiny_ckpt, tmp_path, engines, router
):
    victim = start_server(tiny_ckpt, tmp_path)
    dead = victim.url
    revivals: list[str] = []

    async def on_revive(worker: str) -> None:  # where a client would load the current weights
        revivals.append(worker)
        if len(revivals) == 1:
            raise RuntimeError("not ready")  # keeps the worker out of rotation until the next check

    try:
        url, thread = router([dead], failure_threshold=2, on_revive=on_revive)
        assert http_json("POST", dead + "/pause_generation", {"mode": "in_place"})[0] == 200

        async def kill_mid_request() -> dict:
            async with aiohttp.ClientSession() as s:

                async def send() -> dict:
                    async with s.post(url + "/generate", json=BODY) as resp:
                        assert resp.status == 200
                        return await resp.json()

                req = asyncio.create_task(send())
                await asyncio.to_thread(wait_until, lambda: thread.pool.workers()[0]["in_flight"] == 1)
                assert http_json("POST", f"{url}/add_worker?url={engines[1]}")[0] == 200
                victim.kill()
                return await asyncio.wait_for(req, 30)

        answer = asyncio.run(kill_mid_request())
        assert 1 <= len(answer["output_ids"]) <= 4
        workers = http_json("GET", url + "/list_workers")[1]
        assert [(w["healthy"], w["served"]) for w in workers["workers"]] == [(False, 0), (True, 1)]
        assert workers["retries"] == 1

        # a later request skips the dead engine without a retry; a restart on its port revives it
        assert http_json("POST", url + "/generate", BODY)[0] == 200
        assert thread.pool.retries == 1
        victim = start_server(tiny_ckpt, tmp_path, port=int(dead.rsplit(":", 1)[1]))
        wait_until(lambda: thread.pool.healthy == [dead, engines[1]], what="the restarted engine's revival")
        assert revivals == [dead, dead]
    finally:
        stop_server(victim)


def test_health_checks_mark_a_dead_engine_and_no_healthy_engine_is_a_503(tiny_ckpt, tmp_path, engines):
    victim = start_server(tiny_ckpt, tmp_path)
    dead = victim.url
    victim.kill()
    pool = WorkerPool([dead, engines[0]], health_check_interval=0.2, failure_threshold=3, wait_healthy_s=0.3)

    async def run() -> None:
        await pool.check_health()
        assert pool.healthy == [dead, engines[0]]  # one failed check is below the threshold
        deadline = time.monotonic() + 10
        while dead in pool.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert pool.healthy == [engines[0]] and pool.workers()[0]["failed_checks"] >= 3
        await asyncio.gather(*(pool.generate(BODY) for _ in range(4)))
        assert served(pool) == [0, 4] and pool.retries == 0
        pool.remove(engines[0])
        with pytest.raises(WorkerError) as err:
            await pool.generate(BODY)
        assert err.value.status == 503 and "no healthy engine worker among 1" in err.value.message

    asyncio.run(run())


def test_a_busy_engine_that_answers_health_late_stays_healthy_an_idle_one_does_not(tiny_ckpt, tmp_path):
    """SIGSTOP freezes an engine: its /health times out. With a request in flight through the pool it is
    busy (a long prefill looks the same) and stays in rotation; idle, it is marked unhealthy."""
    frozen = start_server(tiny_ckpt, tmp_path)
    pool = WorkerPool([frozen.url], health_check_interval=None, health_check_timeout=0.2, failure_threshold=2)
    slow = {**BODY, "sampling_params": {**BODY["sampling_params"], "max_new_tokens": 4}}

    async def run() -> None:
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            request = asyncio.ensure_future(pool.generate(slow))
            await asyncio.sleep(0.1)
            for _ in range(3):
                await pool.check_health()
            assert pool.healthy == [frozen.url]  # busy: late answers do not count
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        await request
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(2):
                await pool.check_health()
            assert pool.healthy == []  # idle and silent: unhealthy
        finally:
            os.kill(frozen.proc.pid, signal.SIGCONT)
        await pool.close()

    try:
        asyncio.run(run())
    finally:
        stop_server(frozen)


def test_router_main_serves_until_sigterm_and_imports_no_torch(tmp_path, engines):
    port_file = tmp_path / "port"
    code = "import sys, miles_core.serve.router as r; assert 'torch' not in sys.modules; sys.exit(r.main())"
    cmd = [
        sys.executable,
        "-c",
        code,
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--worker-urls",
        *engines,
    ]
    proc = subprocess.Popen(cmd, env=serve_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: port_file.exists() or proc.poll() is not None, what="the router's port file")
        assert proc.poll() is None, proc.stderr.read()
        url = f"http://127.0.0.1:{port_file.read_text()}"
        assert http_json("GET", url + "/list_workers")[1]["urls"] == engines
        assert http_json("POST", url + "/generate", BODY)[0] == 200
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()
    bad = subprocess.run(
        [sys.executable, "-m", "miles_core.serve.router", "--health-check-interval", "0"],
        env=serve_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "miles router: error: --health-check-interval must be positive, got 0.0."
    ]
