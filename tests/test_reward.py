"""The reward runner: concurrency bound across rollouts, time limit (also for rewards that block), the
check of every returned value, boxed_ prefix, per-row rm_type."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import pytest

from miles_core.rollout.reward import RewardRunner, resolve_rm
from miles_core.types import Sample, Status, UsageError


def make_args(**over) -> argparse.Namespace:
    base = dict(
        rm_type=None, custom_rm_path=None, reward_key=None, group_rm=False, rm_concurrency=1, rm_timeout=None
    )
    base.update(over)
    return argparse.Namespace(**base)


def test_semaphore_survives_a_new_event_loop_per_rollout(tmp_path):
    path = tmp_path / "slow.py"
    path.write_text(
        "import asyncio\nasync def reward(args, sample):\n    await asyncio.sleep(0.01)\n    return 1.0\n"
    )
    runner = RewardRunner(make_args(custom_rm_path=str(path)))
    for _ in range(2):  # each rollout runs asyncio.run anew
        samples = [Sample(index=i, response="x") for i in range(3)]

        async def score_all(batch=samples):
            await asyncio.gather(*(runner.score(s) for s in batch))

        asyncio.run(score_all())
        assert [s.reward for s in samples] == [1.0, 1.0, 1.0]
    assert runner.failures == 0


def test_hanging_reward_is_cut_off_and_marked_failed(tmp_path):
    path = tmp_path / "hang.py"
    path.write_text("import asyncio\nasync def reward(args, sample):\n    await asyncio.sleep(60)\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), rm_timeout=0.05))
    sample = Sample(index=0, response="x")
    asyncio.run(runner.score(sample))
    assert sample.status == Status.FAILED and runner.failures == 1
    assert "timed out" in sample.metadata["reward_error"]


def test_group_rm_scores_whole_group(tmp_path):
    path = tmp_path / "group.py"
    path.write_text(
        "async def reward(args, samples):\n    return [float(i) for i, _ in enumerate(samples)]\n"
    )
    runner = RewardRunner(make_args(custom_rm_path=str(path), group_rm=True))
    samples = [Sample(index=i) for i in range(4)]
    asyncio.run(runner.score_group(samples))
    assert [s.reward for s in samples] == [0.0, 1.0, 2.0, 3.0]


def test_boxed_prefix_and_row_override():
    runner = RewardRunner(make_args(rm_type="boxed_exact_match"))
    s = Sample(index=0, response="so the answer is \\boxed{42}.", label="42")
    asyncio.run(runner.score(s))
    assert s.reward == 1.0
    row = Sample(index=1, response="#### 42", label="42", metadata={"rm_type": "gsm8k"})
    asyncio.run(runner.score(row))
    assert row.reward == 1.0
    assert asyncio.run(resolve_rm("exact_match")(None, Sample(response="42", label="42"))) == 1.0


def test_custom_rm_path_accepts_an_entry_point_name():
    runner = RewardRunner(make_args(custom_rm_path="exact_match"))  # installed by miles-rewards
    s = Sample(index=0, response="7", label="7")
    asyncio.run(runner.score(s))
    assert s.reward == 1.0


BLOCKING = {
    "sync": "import time\ndef reward(args, sample):\n    time.sleep(60)\n",
    # time.sleep in an async def blocks the event loop it runs on, so the loop itself cannot cut it off
    "async": "import time\nasync def reward(args, sample):\n    time.sleep(60)\n",
}


@pytest.mark.parametrize("kind", sorted(BLOCKING))
def test_blocking_reward_is_cut_off_on_time_and_concurrently(tmp_path, kind):
    path = tmp_path / "block.py"
    path.write_text(BLOCKING[kind])
    runner = RewardRunner(make_args(custom_rm_path=str(path), rm_timeout=0.5, rm_concurrency=4))
    samples = [Sample(index=i, response="x") for i in range(4)]

    async def score_all():
        await asyncio.gather(*(runner.score(s) for s in samples))

    start = time.perf_counter()
    asyncio.run(score_all())
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5 + 0.5, elapsed  # the four run side by side: one timeout, not four
    assert all(s.status == Status.FAILED and "timed out" in s.metadata["reward_error"] for s in samples)
    assert runner.failures == 4


def test_sync_rewards_run_and_workers_are_reused(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def reward(args, sample):\n    return len(sample.response)\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), rm_concurrency=3, rm_timeout=5.0))
    before, earlier = threading.active_count(), set(threading.enumerate())
    for _ in range(3):
        samples = [Sample(index=i, response="x" * i) for i in range(20)]

        async def score_all(batch=samples):
            await asyncio.gather(*(runner.score(s) for s in batch))

        asyncio.run(score_all())
        assert [s.reward for s in samples] == [float(i) for i in range(20)]
    assert threading.active_count() - before <= 3  # one worker per call in flight, kept for the next
    workers = [t for t in threading.enumerate() if t.name == "miles-reward" and t not in earlier]
    runner.close()  # a run's end: when it returns the workers and their loops' descriptors are gone
    assert workers and not any(t.is_alive() for t in workers)


def test_a_timeout_error_the_reward_raises_is_not_rm_timeout(tmp_path):
    path = tmp_path / "raises.py"
    path.write_text("async def reward(args, sample):\n    raise TimeoutError('upstream slow')\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), rm_timeout=5.0))
    sample = Sample(index=0, response="x")
    asyncio.run(runner.score(sample))
    assert "raised TimeoutError: upstream slow" in sample.metadata["reward_error"]


@pytest.mark.parametrize(
    ("value", "key", "words"),
    [
        ("'1.0'", None, "returned '1.0' (a str), not a finite number or a dict"),
        ("None", None, "returned None (a NoneType)"),
        ("float('nan')", None, "returned nan (a float)"),
        ("[1.0]", None, "returned [1.0] (a list)"),
        ("{'acc': 1.0}", "score", "without the --reward-key entry 'score'"),
        ("{'score': 'high'}", "score", "returned 'score': 'high', not a finite number"),
        ("{'score': float('inf')}", "score", "returned 'score': inf, not a finite number"),
    ],
)
def test_bad_reward_values_fail_the_sample_with_one_sentence(tmp_path, capsys, value, key, words):
    path = tmp_path / "bad.py"
    path.write_text(f"def reward(args, sample):\n    return {value}\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), reward_key=key))
    sample = Sample(index=7, response="x")
    asyncio.run(runner.score(sample))
    assert sample.status == Status.FAILED and sample.reward == 0.0 and runner.failures == 1
    assert words in sample.metadata["reward_error"]
    assert f"--custom-rm-path {path}" in sample.metadata["reward_error"]
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("[miles] sample 7 FAILED: reward --custom-rm-path") and words in line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("True", 1.0),
        ("3", 3.0),
        ("np.float32(0.5)", 0.5),
        ("np.int64(2)", 2.0),
        ("{'score': 1, 'x': 'y'}", 1.0),
    ],
)
def test_good_reward_values_are_kept(tmp_path, value, expected):
    path = tmp_path / "good.py"
    path.write_text(f"import numpy as np\ndef reward(args, sample):\n    return {value}\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), reward_key="score"))
    sample = Sample(index=0, response="x")
    asyncio.run(runner.score(sample))
    assert sample.status != Status.FAILED and runner.failures == 0
    assert sample.get_reward_value("score") == expected


def test_dict_reward_without_reward_key_stops_with_one_sentence(tmp_path):
    path = tmp_path / "d.py"
    path.write_text("def reward(args, sample):\n    return {'score': 1.0, 'acc': True}\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path)))
    with pytest.raises(UsageError, match=r"dict with entries \['acc', 'score'\]; pass --reward-key"):
        asyncio.run(runner.score(Sample(index=0, response="x")))


def test_group_rm_checks_each_reward(tmp_path):
    path = tmp_path / "group.py"
    path.write_text("async def reward(args, samples):\n    return [1.0, 'x', float('nan'), 0]\n")
    runner = RewardRunner(make_args(custom_rm_path=str(path), group_rm=True))
    samples = [Sample(index=i) for i in range(4)]
    asyncio.run(runner.score_group(samples))
    assert [s.status == Status.FAILED for s in samples] == [False, True, True, False]
    assert [s.reward for s in samples] == [1.0, 0.0, 0.0, 0.0]
