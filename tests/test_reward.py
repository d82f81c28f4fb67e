"""The reward runner: concurrency bound across rollouts, time limit, boxed_ prefix, per-row rm_type."""

from __future__ import annotations

import argparse
import asyncio

from miles_core.rollout.reward import RewardRunner, resolve_rm
from miles_core.types import Sample, Status


def make_args(**over) -> argparse.Namespace:
    base = dict(rm_type=None, custom_rm_path=None, group_rm=False, rm_concurrency=1, rm_timeout=None)
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
