"""DAPO's dynamic sampling: the built-in filter, how filter specs resolve, and runs whose trained batches
hold only groups that passed (``--rollout-batch-size`` of them) with the filtered fraction logged."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import base_argv, error_of, run_example

from miles_core.cli import main
from miles_core.rollout.dynamic_sampling import check_reward_nonzero_std, load_filter
from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture)
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status, UsageError

FILTER = "check_reward_nonzero_std"


class Args:
    reward_key = None


def group(*rewards, failed=()):
    return [
        Sample(index=i, reward=r, status=Status.FAILED if i in failed else Status.COMPLETED)
        for i, r in enumerate(rewards)
    ]


def test_check_reward_nonzero_std():
    out = check_reward_nonzero_std(Args(), group(1.0, 1.0, 1.0, 1.0))
    assert not out.keep and out.reason == "zero_std_1.0"
    assert not check_reward_nonzero_std(Args(), group(0.0, 0.0)).keep
    assert check_reward_nonzero_std(Args(), group(1.0, 0.0, 1.0, 1.0)).keep
    # the one differing reward belongs to a failed sample: not counted
    assert not check_reward_nonzero_std(Args(), group(0.0, 1.0, 1.0, failed=(0,))).keep
    # a dict reward is read at --reward-key
    keyed = Args()
    keyed.reward_key = "acc"
    assert check_reward_nonzero_std(keyed, group({"acc": 1.0}, {"acc": 0.0})).keep


def test_filter_specs(tmp_path):
    for spec in (
        FILTER,
        f"slime.rollout.filter_hub.dynamic_sampling_filters.{FILTER}",
        f"miles.rollout.filter_hub.dynamic_sampling_filters.{FILTER}",
        f"miles_core.rollout.dynamic_sampling:{FILTER}",
    ):
        assert load_filter(spec) is check_reward_nonzero_std, spec
    path = tmp_path / "mine.py"
    path.write_text("def filter(args, samples, **kw):\n    return True\n")
    assert load_filter(str(path))(None, []) is True
    with pytest.raises(UsageError, match="not an installed miles.filters name"):
        load_filter("check_reward_std")


REWARD = """
async def reward(args, sample):
    # prompts "What is A+B?": every response of an even A scores 1 (a zero-std group), odd A by length
    a = int(sample.prompt.split("What is ")[1].split("+")[0])
    return 1.0 if a % 2 == 0 else float(len(sample.response) % 2)
"""


@pytest.fixture
def trained_groups(monkeypatch):
    """The rewards of each group of every batch the trainer trains on."""
    seen: list[list[list[float]]] = []
    original = Trainer.train

    def train(self, rollout_id, batch):
        groups: dict[int, list[float]] = {}
        for s, r in zip(batch.samples, batch.rewards.tolist()):
            groups.setdefault(s.group_index, []).append(r)
        seen.append(list(groups.values()))
        return original(self, rollout_id, batch)

    monkeypatch.setattr(Trainer, "train", train)
    return seen


@pytest.mark.parametrize(
    "extra", [[], ["--async", "--partial-rollout"]], ids=["sync", "async-partial-rollout"]
)
def test_trained_batches_hold_only_passing_groups(
    tiny_ckpt, prompts_file, tmp_path, capsys, trained_groups, extra
):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    run = tmp_path / "run"
    argv = base_argv(tiny_ckpt, prompts_file, run, reward, 3) + [
        "--dynamic-sampling-filter-path",
        f"slime.rollout.filter_hub.dynamic_sampling_filters.{FILTER}",
        "--over-sampling-batch-size",
        "3",
        *extra,
    ]
    assert main([*argv, "--save", str(tmp_path / "ckpt")]) == 0
    assert len(trained_groups) == 3
    for groups in trained_groups:
        assert len(groups) == 2  # --rollout-batch-size
        assert all(len(g) == 4 and torch.tensor(g).std() > 1e-6 for g in groups), groups
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in rows if "rollout/dynamic_sampling/filtered_frac" in r]
    assert len(rollouts) == 3
    # about half the prompts have an even A: some groups were filtered, and the count adds up
    assert sum(r["rollout/dynamic_sampling/groups_filtered"] for r in rollouts) > 0
    for r in rollouts:
        generated = r["rollout/dynamic_sampling/groups_generated"]
        assert generated == 3 * r["rollout/dynamic_sampling/rounds"]
        assert (
            r["rollout/dynamic_sampling/filtered_frac"]
            == r["rollout/dynamic_sampling/groups_filtered"] / generated
        )
        kept = (
            generated
            - r["rollout/dynamic_sampling/groups_filtered"]
            - r["rollout/dynamic_sampling/groups_surplus"]
        )
        assert kept == 2 and r["rollout/num_samples"] == 8
    # the checkpoint after the last rollout saves the data position after every round's draws
    data = json.loads((tmp_path / "ckpt" / "iter_0000003" / "loop_state.json").read_text())["data"]
    drawn = 3 * sum(r["rollout/dynamic_sampling/rounds"] for r in rollouts)
    assert data["epoch"] * 40 + data["offset"] == drawn


def test_over_sampling_without_a_filter_trains_the_first_groups(
    tiny_ckpt, prompts_file, reward_file, tmp_path, trained_groups
):
    run = tmp_path / "run"
    argv = base_argv(tiny_ckpt, prompts_file, run, reward_file, 1) + ["--over-sampling-batch-size", "5"]
    assert main(argv) == 0
    assert [len(g) for g in trained_groups[0]] == [4, 4]
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollout/dynamic_sampling/groups_surplus"] == 3.0
    assert row["rollout/dynamic_sampling/filtered_frac"] == 0.0


def test_a_filter_that_passes_nothing_stops_the_run(tiny_ckpt, prompts_file, tmp_path, capsys):
    reject = tmp_path / "reject.py"
    reject.write_text("def filter(args, samples, **kw):\n    return False\n")
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward, 1)
    argv += ["--dynamic-sampling-filter-path", f"{reject}:filter", "--over-sampling-batch-size", "20"]
    assert "passed none of their groups" in error_of(capsys, argv)


def test_dynamic_sampling_flags_are_checked(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward_file)
    err = error_of(capsys, [*argv, "--dynamic-sampling-filter-path", FILTER, "--n-samples-per-prompt", "1"])
    assert "raise --n-samples-per-prompt to 2 or more" in err
    err = error_of(capsys, [*argv, "--over-sampling-batch-size", "0"])
    assert "--over-sampling-batch-size must be at least 1" in err


@pytest.mark.slow
def test_dapo_example_learns_the_demo_task(tmp_path):
    """examples/dapo.yaml (40 rollouts) lifts held-out greedy accuracy by at least 0.15, logging what
    dynamic sampling filtered."""
    summary, rows = run_example(tmp_path, "dapo.yaml")
    assert summary["accuracy_after"] >= summary["accuracy_before"] + 0.15, summary
    rollouts = [r for r in rows if "rollout/reward_mean" in r]
    assert all("rollout/dynamic_sampling/filtered_frac" in r for r in rollouts)
    assert max(r["rollout/dynamic_sampling/filtered_frac"] for r in rollouts) > 0
