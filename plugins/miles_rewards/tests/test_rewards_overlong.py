"""DAPO's overlong penalty: the formula against hand-computed values, the hooks, and a short real run."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from miles_rewards import plugin
from miles_rewards.overlong import apply_overlong_penalty, overlong_metrics, overlong_penalty

from miles_core.args import parse_args
from miles_core.plugins import configure_plugins, get_plugin_manager
from miles_core.types import Sample, Status, UsageError

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("length", "factor", "expected"),
    [
        (0, 1.0, 0.0),
        (12, 1.0, 0.0),  # exactly max_len - buffer: no penalty yet
        (13, 1.0, -0.125),  # 1 token into the 8-token buffer
        (16, 1.0, -0.5),
        (20, 1.0, -1.0),  # the whole budget used: lose `factor`
        (16, 0.5, -0.25),
        (20, 0.0, 0.0),
    ],
)
def test_penalty_values(length, factor, expected):
    assert overlong_penalty(length, max_len=20, buffer_len=8, factor=factor) == pytest.approx(expected)


def ns(**over) -> SimpleNamespace:
    base = dict(
        overlong_buffer_len=8, overlong_penalty_factor=1.0, rollout_max_response_len=20, reward_key=None
    )
    return SimpleNamespace(**{**base, **over})


def test_apply_to_float_dict_and_failed_rewards():
    short = Sample(index=0, response_length=10, reward=1.0)
    long = Sample(index=1, response_length=16, reward=1.0)
    failed = Sample(index=2, response_length=20, reward=0.0, status=Status.FAILED)
    apply_overlong_penalty(ns(), [short, long, failed])
    assert (short.reward, long.reward, failed.reward) == (1.0, 0.5, 0.0)
    assert short.metadata["overlong_penalty"] == 0.0 and "overlong_penalty" not in failed.metadata

    dapo = Sample(index=3, response_length=20, reward={"score": 1.0, "acc": True, "pred": "4"})
    apply_overlong_penalty(ns(reward_key="score"), [dapo])
    assert dapo.reward == {"score": 0.0, "acc": True, "pred": "4"}
    assert dapo.get_reward_value("score") == 0.0

    with pytest.raises(UsageError, match="--reward-key"):
        apply_overlong_penalty(ns(), [Sample(index=4, response_length=20, reward={"score": 1.0})])


def test_metrics():
    samples = [Sample(response_length=n, reward=1.0) for n in (4, 16, 20)]
    apply_overlong_penalty(ns(), samples)
    m = overlong_metrics(samples)
    assert m["overlong_penalty_mean"] == pytest.approx((0.0 - 0.5 - 1.0) / 3)
    assert m["overlong_penalized_frac"] == pytest.approx(2 / 3)
    assert overlong_metrics([Sample()]) == {}


def configured(*flags: str):
    """A plugin manager with this plugin alone, ``flags`` parsed by the real parser and configured."""
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[plugin])
    args = parse_args(["--rollout-max-response-len", "20", *flags], pm)
    return pm, args, configure_plugins(pm, args)["miles_rewards.plugin"]


def test_flags_and_configure():
    parser = argparse.ArgumentParser()
    plugin.add_arguments(parser=parser)
    args = parser.parse_args([])
    assert (args.overlong_buffer_len, args.overlong_penalty_factor) == (None, 1.0)
    args = parser.parse_args(["--overlong-buffer-len", "256", "--overlong-penalty-factor", "0.5"])
    assert (args.overlong_buffer_len, args.overlong_penalty_factor) == (256, 0.5)

    assert configured("--overlong-buffer-len", "8")[2] is True  # the penalty makes the plugin active
    assert configured()[2] is False
    with pytest.raises(UsageError, match="--overlong-buffer-len 30 must be between 1 and"):
        configured("--overlong-buffer-len", "30")
    with pytest.raises(UsageError, match="--overlong-buffer-len 0"):
        configured("--overlong-buffer-len", "0")
    with pytest.raises(UsageError, match="--overlong-penalty-factor"):
        configured("--overlong-buffer-len", "8", "--overlong-penalty-factor", "-1.0")


def test_hooks_through_pluggy():
    pm, args, _ = configured("--overlong-buffer-len", "8")
    samples = [Sample(response_length=18, reward=1.0)]
    pm.hook.post_reward(args=args, samples=samples)
    assert samples[0].reward == pytest.approx(0.25)
    assert pm.hook.rollout_metrics(args=args, rollout_id=0, samples=samples) == [
        {"overlong_penalty_mean": -0.75, "overlong_penalized_frac": 1.0}
    ]
    pm, args, _ = configured()  # off: no run object, the hooks do nothing
    off = [Sample(response_length=18, reward=1.0)]
    pm.hook.post_reward(args=args, samples=off)
    assert off[0].reward == 1.0
    assert pm.hook.rollout_metrics(args=args, rollout_id=0, samples=off) == []


def core_test_helpers():
    """The core tests' conftest (tiny-checkpoint builder), imported under a name of its own."""
    spec = importlib.util.spec_from_file_location(
        "_miles_core_tests_conftest", REPO / "tests" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_run_applies_the_penalty(tmp_path):
    """A one-rollout `miles train` on a tiny random model: the penalty reaches the logged rewards."""
    from miles_core.cli import main

    ckpt = core_test_helpers().make_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{a}+{a}=", "label": str(2 * a)}) + "\n" for a in range(4))
    )
    reward = tmp_path / "reward.py"
    reward.write_text("async def reward(args, sample):\n    return 1.0\n")
    run = tmp_path / "run"
    argv = ["train", "--hf-checkpoint", str(ckpt), "--prompt-data", str(data), "--input-key", "prompt"]
    argv += ["--label-key", "label", "--rollout-batch-size", "2", "--n-samples-per-prompt", "2"]
    argv += ["--num-rollout", "1", "--rollout-max-response-len", "4", "--custom-rm-path", str(reward)]
    argv += ["--micro-batch-size", "4", "--run-dir", str(run), "--overlong-buffer-len", "4"]
    assert main(argv) == 0
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # buffer == budget: a response of L tokens loses L/4, so reward_mean = 1 - mean(L)/4.
    assert m["rollout/overlong_penalty_mean"] < 0
    assert m["rollout/reward_mean"] == pytest.approx(1.0 - m["rollout/response_len_mean"] / 4)
    assert m["rollout/reward_mean"] == pytest.approx(1.0 + m["rollout/overlong_penalty_mean"])
