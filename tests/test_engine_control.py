"""Engine control between steps: abort by request id, pause/continue, weight updates while requests run
(same loop and another thread), per-token weight versions, cache flush and memory release."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import torch

from miles_core.engine import Engine
from miles_core.model import load_model
from miles_core.model.hf_io import named_hf_tensors

LONG = {"temperature": 1.0, "max_new_tokens": 40}


@pytest.fixture()
def engine(tiny_ckpt):
    e = Engine(load_model(tiny_ckpt).eval(), None, max_batch_size=8, seed=3)
    e._eos = set()  # every request runs its full length unless aborted
    return e


async def _until(cond, limit=2000):
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


def test_abort_by_rid_returns_partial_output_and_frees_the_slot(engine):
    async def go():
        a = asyncio.ensure_future(engine.generate([5, 6, 7], LONG, rid="a"))
        b = asyncio.ensure_future(engine.generate([5, 6, 8], LONG, rid="b"))
        await _until(lambda: engine.num_running == 2 and len(engine._running[0].out) >= 3)
        assert engine.abort("a") == 1
        out_a = await a
        assert engine.abort("nope") == 0
        out_b = await b
        return out_a, out_b

    out_a, out_b = asyncio.run(go())
    assert out_a.finish_reason == "abort" and out_a.rid == "a"
    assert 3 <= len(out_a.output_ids) < 40 and len(out_a.log_probs) == len(out_a.output_ids)
    assert out_b.finish_reason == "length" and len(out_b.output_ids) == 40
    assert sorted(engine._free) == list(range(8))  # both slots back


def test_abort_of_a_waiting_request_answers_it_with_nothing(engine):
    engine.max_batch_size = 1

    async def go():
        first = asyncio.ensure_future(engine.generate([5, 6], LONG, rid="x"))
        queued = asyncio.ensure_future(engine.generate([5, 7], LONG, rid="y"))
        await _until(lambda: engine.num_running == 1)
        assert engine.num_waiting == 1
        engine.abort("y")
        out_y = await queued
        return await first, out_y

    out_x, out_y = asyncio.run(go())
    assert out_y.finish_reason == "abort" and out_y.output_ids == []
    assert out_x.finish_reason == "length"


def test_pause_in_place_then_update_labels_each_token_with_its_version(engine, tiny_ckpt):
    new = load_model(tiny_ckpt).eval()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.01)

    async def go():
        fut = asyncio.ensure_future(engine.generate([5, 6, 7], LONG, rid="r"))
        await _until(lambda: engine.num_running and len(engine._running[0].out) >= 5)
        engine.pause_generation("in_place")
        n = len(engine._running[0].out)
        await asyncio.sleep(0.02)
        assert len(engine._running[0].out) == n  # no step while paused
        engine.update_weights(named_hf_tensors(new), version=7)
        engine.continue_generation()
        return n, await fut

    n, out = asyncio.run(go())
    assert out.finish_reason == "length" and out.weight_version == 7
    assert out.output_weight_versions == [0] * n + [7] * (40 - n)


def test_update_from_another_thread_runs_between_steps(engine, tiny_ckpt):
    """The trainer's thread updates weights while the scheduler decodes on its own loop's thread."""
    new = named_hf_tensors(load_model(tiny_ckpt).eval())
    started = threading.Event()
    result = {}

    def rollout():
        async def go():
            fut = asyncio.ensure_future(engine.generate([5, 6, 7], {**LONG, "max_new_tokens": 400}))
            await _until(lambda: engine.num_running)
            started.set()
            return await fut

        result["out"] = asyncio.run(go())

    t = threading.Thread(target=rollout)
    t.start()
    assert started.wait(10)
    engine.update_weights(new, version=1)  # blocks until the scheduler ran it
    t.join(60)
    versions = result["out"].output_weight_versions
    assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)


def test_pause_abort_mode_answers_everything_and_waits_for_continue(engine):
    async def go():
        futs = [asyncio.ensure_future(engine.generate([5, i], LONG)) for i in range(3)]
        await _until(lambda: engine.num_running == 3)
        assert engine.pause_generation("abort") == 3
        outs = await asyncio.gather(*futs)
        later = asyncio.ensure_future(engine.generate([9, 9], {**LONG, "max_new_tokens": 4}))
        await asyncio.sleep(0.02)
        assert not later.done() and engine.num_running == 0  # paused: admitted only after continue
        engine.continue_generation()
        return outs, await later

    outs, later = asyncio.run(go())
    assert all(o.finish_reason == "abort" for o in outs)
    assert later.finish_reason == "length" and len(later.output_ids) == 4
    with pytest.raises(Exception, match="not one of"):
        engine.pause_generation("retract")


def test_flush_and_release_free_the_cache_and_generation_resumes(engine):
    engine.generate_batch([[5, 6]], {**LONG, "max_new_tokens": 3})
    assert engine.kv_cache is not None
    assert engine.flush_cache() is True and engine.kv_cache is None
    engine.release_memory_occupation()
    assert engine.memory_released and engine.paused
    engine.resume_memory_occupation()
    out = engine.generate_batch([[5, 6]], {**LONG, "max_new_tokens": 3})[0]
    assert len(out.output_ids) == 3 and engine.kv_cache is not None


@pytest.mark.parametrize("drop", ["flush_cache", "release_memory_occupation"])
def test_dropped_cache_and_graphs_go_at_once_without_the_cyclic_gc(tiny_ckpt, drop):
    """Flush and release free the KV cache and the static-step graphs by reference counting: nothing is
    left for a garbage collection that a released engine (or a server) may not run for a long time."""
    e = Engine(load_model(tiny_ckpt).eval(), None, max_batch_size=8, cuda_graph=True)  # static step on CPU
    e.generate_batch([[5, 6]], {**LONG, "max_new_tokens": 3})
    refs = [weakref.ref(e._graphs), weakref.ref(e.kv_cache), weakref.ref(e.kv_cache.k[0])]
    gc.collect()
    gc.disable()
    try:
        getattr(e, drop)()
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
    if drop == "release_memory_occupation":
        e.resume_memory_occupation()
    assert len(e.generate_batch([[5, 6]], {**LONG, "max_new_tokens": 3})[0].output_ids) == 3


def test_release_is_refused_while_requests_run(engine):
    async def go():
        fut = asyncio.ensure_future(engine.generate([5, 6], LONG))
        await _until(lambda: engine.num_running)
        with pytest.raises(Exception, match="abort them"):
            engine.release_memory_occupation()
        assert engine.flush_cache() is False
        return await fut

    assert asyncio.run(go()).finish_reason == "length"


def test_warm_up_builds_every_batch_bucket_and_keeps_the_tokens(tiny_ckpt):
    params = {"temperature": 1.0, "max_new_tokens": 6}
    prompts = [[5, 6, i] for i in range(5)]
    cold = Engine(load_model(tiny_ckpt).eval(), None, max_batch_size=24, seed=1, cuda_graph=True)
    warm = Engine(load_model(tiny_ckpt).eval(), None, max_batch_size=24, seed=1, cuda_graph=True)
    assert warm.warm_up(40) == 6  # row buckets 1, 2, 4, 8, 16, 24
    assert warm.kv_cache.max_len == 64 and len(warm._graphs._graphs) == 6
    outs = [e.generate_batch(prompts, params) for e in (cold, warm)]
    assert [o.output_ids for o in outs[0]] == [o.output_ids for o in outs[1]]
    assert Engine(load_model(tiny_ckpt).eval(), None, cuda_graph=False).warm_up(40) == 0


def test_a_control_call_while_the_schedulers_loop_is_stopped_runs_at_once(engine, tiny_ckpt):
    """A rollout thread drives its own loop with run_until_complete: when it returns, the scheduler task
    waits there (a request still runs), alive but not running. A control call from another thread must
    run at once instead of waiting for that scheduler."""
    loop = asyncio.new_event_loop()
    try:
        long = loop.create_task(engine.generate([5, 7], {**LONG, "max_new_tokens": 30}))
        short = loop.run_until_complete(engine.generate([5, 6], {**LONG, "max_new_tokens": 3}))
        assert len(short.output_ids) == 3
        assert engine._alive and engine.num_running == 1 and not loop.is_running()
        new = named_hf_tensors(load_model(tiny_ckpt).eval())
        t = threading.Thread(target=lambda: engine.update_weights(new, 2))
        t.start()
        t.join(10)
        assert not t.is_alive(), "the control call waited for a scheduler whose loop is stopped"
        assert engine.weight_version == 2
        out = loop.run_until_complete(long)
        n = out.output_weight_versions.count(0)
        assert 0 < n < 30 and out.output_weight_versions == [0] * n + [2] * (30 - n)
    finally:
        loop.run_until_complete(asyncio.sleep(0.05))  # let the scheduler task finish
        loop.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_released_weights_leave_the_device_and_come_back_exactly(tiny_ckpt):
    """On CUDA the release parks the weights in host memory in place: device memory drops, and after the
    resume (and after an update made while released) the engine samples what it sampled before."""
    e = Engine(
        load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda").eval(), None, max_batch_size=8, seed=3
    )
    params = {"temperature": 1.0, "max_new_tokens": 8, "sampling_seed": 11}
    want = e.generate_batch([[5, 6, 7]], params)[0].output_ids
    weights = [(n, t.clone()) for n, t in named_hf_tensors(e.model)]
    before = torch.cuda.memory_allocated()
    e.release_memory_occupation()
    assert torch.cuda.memory_allocated() < before - sum(t.numel() * t.element_size() for _, t in weights) // 2
    e.resume_memory_occupation()
    assert e.generate_batch([[5, 6, 7]], params)[0].output_ids == want
    e.release_memory_occupation()
    e.update_weights(weights, version=1)  # takes the weights' memory back to write them
    e.resume_memory_occupation()
    assert e.generate_batch([[5, 6, 7]], params)[0].output_ids == want
