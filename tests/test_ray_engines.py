"""Rollout engines as Ray actors on a real local Ray cluster (127.0.0.1 only): two `miles serve` actors
answer, one killed by SIGKILL is noticed and restarted in a new process, `HttpEngine` drives the fleet
unchanged and stopping it leaves no engine process, an engine that cannot start says why; trainer-rank and
engine actors share a bundle when colocated; a placement group the cluster cannot hold is refused in one
sentence; a trainer rank that dies is named even when a peer's collective fails first."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import miles_core  # noqa: E402
from miles_core.args import build_parser, parse_args  # noqa: E402
from miles_core.distributed.engines import RayEngineFleet  # noqa: E402
from miles_core.distributed.placement import (  # noqa: E402
    LOOPBACK,
    Layout,
    create_placement_group,
    start_ray,
    stop_ray,
)
from miles_core.errors import UsageError  # noqa: E402
from miles_core.serve.client import HttpEngine  # noqa: E402
from miles_core.testing import http_json  # noqa: E402

GENERATE = {"input_ids": [5, 6, 7, 8], "sampling_params": {"temperature": 0.0, "max_new_tokens": 4}}


@pytest.fixture(scope="module")
def cluster():
    started = start_ray(num_cpus=8)  # logical CPUs: bundles to place, not cores to use
    yield
    if started:
        stop_ray()


@contextlib.contextmanager
def ray_fleet(ckpt: Path, run_dir: Path, engines: int) -> Iterator[tuple[RayEngineFleet, argparse.Namespace]]:
    """``engines`` engine actors disaggregated from one trainer rank (CPU bundles), not started yet."""
    argv = ["--hf-checkpoint", str(ckpt), "--device", "cpu", "--rollout-num-engines", str(engines)]
    args = parse_args([*argv, "--run-dir", str(run_dir), "--rollout-health-check-interval", "0.3"])
    layout = Layout.from_args(args)
    with create_placement_group(layout, timeout=60) as placement:
        fleet = RayEngineFleet(args, layout, placement, weights=str(ckpt), start_timeout=120)
        try:
            yield fleet, args
        finally:
            fleet.stop()


@pytest.fixture(scope="module")
def served(cluster, tiny_ckpt, tmp_path_factory):
    """Two engines and the run's flags, shared by the tests below in order: serve, one killed and
    restarted, `HttpEngine` over them, stopped."""
    with ray_fleet(tiny_ckpt, tmp_path_factory.mktemp("run"), 2) as fleet_and_args:
        yield fleet_and_args


@pytest.fixture
def fleet(served):
    return served[0]


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ip(hexip: str) -> str:
    """An address of /proc/net/tcp{,6} (32-bit words in host order); a v4-mapped v6 one as v4."""
    raw = b"".join(bytes.fromhex(hexip[i : i + 8])[::-1] for i in range(0, len(hexip), 8))
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    text = socket.inet_ntop(socket.AF_INET6, raw)
    return text.removeprefix("::ffff:") if text.startswith("::ffff:") and "." in text else text


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP (v4 and v6) addresses process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                hexip, hexport = cols[1].split(":")
                out.add((_ip(hexip), int(hexport, 16)))
    return out


def test_local_cluster_is_on_loopback_only(cluster):
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {LOOPBACK}
    assert ray.util.get_node_ip_address() == LOOPBACK
    assert start_ray() is False  # already connected: the caller does not own it


def test_two_engine_actors_serve(fleet):
    urls = fleet.start()
    assert fleet.urls == urls and len(urls) == 2 and fleet.dead() == []
    pids = [e.pid for e in fleet.engines]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for e in fleet.engines:
        assert e.url.startswith(f"http://{LOOPBACK}:") and e.node_ip == LOOPBACK
        assert {ip for ip, _ in listening(e.pid)} == {LOOPBACK}  # the server and Ray's own sockets
        assert e.about["miles_core"] == miles_core.__file__  # the driver's miles, not another install
        assert e.about["device"] == "cpu" and e.about["gpu_ids"] == []
        code, body = http_json("POST", e.url + "/generate", GENERATE)
        assert code == 200 and len(body["output_ids"]) == 4
        assert "serving on" in e.log_path.read_text()
        assert e.log_path.parent.name == "engines" and e.log_path.name.startswith("engine-")


def test_killed_engine_is_noticed_and_restarted_in_a_new_process(fleet):
    victim = fleet.engines[0]
    old_pid = victim.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: fleet.dead() == [0], 60, "the killed engine was not reported dead")
    assert not victim.alive()
    url = fleet.restart(0)
    assert url == victim.url and victim.pid != old_pid and gone(old_pid)
    assert victim.alive() and fleet.dead() == []
    code, body = http_json("POST", url + "/generate", GENERATE)
    assert code == 200 and len(body["output_ids"]) == 4
    starts = [ln for ln in victim.log_path.read_text().splitlines() if ln.startswith("--- ")]
    assert len(starts) == 2 and f"pid {victim.pid})" in starts[1]  # Ray's restart, in the same log


def test_http_engine_drives_the_fleet_and_stopping_leaves_no_engine_process(served):
    """`HttpEngine` over the Ray fleet, unchanged: it generates, its watcher restarts a killed actor, and
    closing it stops the fleet (`RayEngineFleet.stop`): no engine process is left."""
    fleet, args = served
    pids = [e.pid for e in fleet.engines]
    client = HttpEngine(args, list(fleet.urls), weights=args.hf_checkpoint, fleet=fleet)
    try:
        out = asyncio.run(client.generate([5, 6, 7], {"temperature": 0.0, "max_new_tokens": 3}))
        assert len(out.output_ids) == 3
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: client.metrics()["engine_restarts"] == 1, 90, "the watcher did not restart it")
        assert fleet.engines[1].pid != pids[1] and fleet.dead() == []
        pids.append(fleet.engines[1].pid)
        out = asyncio.run(client.generate([5, 6, 7], {"temperature": 0.0, "max_new_tokens": 3}))
        assert len(out.output_ids) == 3
    finally:
        client.close()
    assert fleet.stopped
    wait_for(lambda: all(gone(p) for p in pids), 10, "an engine process outlived stop()")


def test_a_stopped_fleet_stays_stopped(fleet):
    fleet.stop()  # again: nothing happens
    assert fleet.stopped and fleet.dead() == [0, 1]
    with pytest.raises(RuntimeError, match="stopping"):
        fleet.restart(0)


def test_engine_that_cannot_start_is_reported_in_one_sentence(cluster, tmp_path):
    with ray_fleet(tmp_path / "no-model", tmp_path / "run", 1) as (fleet, _):
        with pytest.raises(UsageError) as err:
            fleet.start()
    log = tmp_path / "run" / "engines" / "engine-0.log"
    assert str(err.value) == (
        f"rollout engine #0 died before it was ready (--hf-checkpoint {tmp_path / 'no-model'} is not an HF "
        f"checkpoint folder; point it at one.); see {log}."
    )
    assert fleet.stopped and fleet.dead() == [0]


def test_colocated_trainer_rank_and_engine_share_a_bundle(cluster):
    args = build_parser().parse_args(["--device", "cpu", "--actor-num-gpus-per-node", "2", "--colocate"])
    layout = Layout.from_args(args)

    @ray.remote
    class Probe:
        def where(self):
            ctx = ray.get_runtime_context()
            return ctx.get_placement_group_id(), ctx.get_assigned_resources()

    with create_placement_group(layout, timeout=30) as placement:
        actors = [Probe.options(**placement.trainer_options(r)).remote() for r in range(2)]
        actors += [Probe.options(**placement.engine_options(j)).remote() for j in range(layout.num_engines)]
        seen = ray.get([a.where.remote() for a in actors], timeout=60)
        assert {g for g, _ in seen} == {placement.group.id.hex()}
        assert [r["CPU"] for _, r in seen] == [0.4, 0.4, 0.2, 0.2]
        for a in actors:
            ray.kill(a)


def test_placement_group_the_cluster_cannot_hold_is_refused(cluster):
    args = build_parser().parse_args(["--device", "cuda", "--actor-num-gpus-per-node", "4", "--colocate"])
    start = time.monotonic()
    with pytest.raises(UsageError) as err:
        create_placement_group(Layout.from_args(args), timeout=1)
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert "need 4 GPU and 4 CPU" in msg and "it has 0 GPU" in msg and msg.count(".") == 1, msg
    groups = ray.util.placement_group_table().values()
    asked = [g for g in groups if any("GPU" in b for b in g["bundles"].values())]
    assert asked and all(g["state"] == "REMOVED" for g in asked)  # nothing of it stays reserved
    # A cluster that cannot grow (the local one a run starts) says so at once, with the same sentence.
    start = time.monotonic()
    with pytest.raises(UsageError) as again:
        create_placement_group(Layout.from_args(args), timeout=60, fixed_size=True)
    assert time.monotonic() - start < 5 and str(again.value) == msg


class _Rank:
    """A stand-in trainer rank: ``step`` raises after ``fail_after`` seconds (a collective whose peer is
    gone) or kills its own process after ``die_after`` seconds."""

    def step(self, fail_after: float | None, die_after: float | None) -> None:
        if die_after is not None:
            time.sleep(die_after)
            os._exit(1)
        time.sleep(fail_after)
        raise RuntimeError("Read error [127.0.0.1]:22756: Connection reset by peer")


def _group_wait(plan: list[tuple[float | None, float | None]]) -> BaseException:
    import sys

    from ray import cloudpickle

    from miles_core.distributed.group import TrainGroup

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this file
    ranks = [ray.remote(num_cpus=0)(_Rank).remote() for _ in plan]
    group = TrainGroup(argparse.Namespace(save=None), ranks, colocated=False)
    refs = [r.step.remote(*p) for r, p in zip(ranks, plan)]
    with pytest.raises(Exception) as err:
        group.wait(refs, list(range(len(plan))))
    return err.value


def test_a_rank_that_dies_is_named_though_a_peer_fails_first(cluster):
    """SIGKILL one rank mid-collective and its peer's collective fails at once ("connection reset"),
    often before Ray reports the death: the run still ends naming the dead rank, not the peer's error."""
    from miles_core.distributed.group import RankDied

    err = _group_wait([(0.1, None), (None, 1.0)])
    assert isinstance(err, RankDied) and str(err).startswith("trainer rank 1 died"), err
    assert "pass --save DIR" in str(err)


def test_an_error_in_every_rank_is_raised_as_it_is(cluster):
    from miles_core.distributed.group import DEATH_GRACE_S

    t0 = time.monotonic()
    err = _group_wait([(0.1, None), (0.2, None)])
    assert isinstance(err, RuntimeError) and "Connection reset" in str(err), err
    assert time.monotonic() - t0 < DEATH_GRACE_S  # the others' answers came in: no waiting out the grace
