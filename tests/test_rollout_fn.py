"""``--rollout-function-path`` (slime's custom rollout function) and generate functions that return several
samples per call, end to end on the demo checkpoint: grouping, rewards and the groups the advantages use."""

from __future__ import annotations

import textwrap

import pytest
from test_debug_modes import demo_argv, error_of, rows

import miles_core.train.advantages as advantages
from miles_core.cli import main
from miles_core.rollout.dumps import load_rollout

WRAPPER = """
    from miles_core.api import generate_rollout as builtin

    class Output:  # the shape of slime's RolloutFnTrainOutput
        def __init__(self, samples, metrics):
            self.samples, self.metrics = samples, metrics

    def generate_rollout(args, rollout_id, data_source, evaluation=False):
        groups = builtin(args, rollout_id, data_source, evaluation)
        return Output(groups, {"wrapped_groups": len(groups), "rollout_id_seen": rollout_id})
"""

BRANCHING = """
    import copy

    async def generate_rollout(args, rollout_id, data_source, evaluation=False):
        first, second = data_source.get_samples(2)
        # The first prompt at the rollout's settings; the second with at most 3 new tokens.
        (first,) = await data_source.generate([first])
        (second,) = await data_source.generate([second], {"max_new_tokens": 3})
        # A branch of the first group's sample 0, handed back unrewarded: the run must reward it.
        branch = copy.deepcopy(first[0])
        branch.reward = None
        return [first + [branch], second]
"""

# Two samples per call, one per "turn": the first answer alone, then the same prompt answered again.
TWO_PER_CALL = """
    import copy
    from miles_core.rollout.generate import single_turn

    async def generate(args, sample, sampling_params):
        again = copy.deepcopy(sample)
        first = await single_turn(args, sample, sampling_params)
        second = await single_turn(args, again, dict(sampling_params, max_new_tokens=4))
        second.metadata["turn"] = 1
        return [first, second]
"""


def write(tmp_path, name: str, source: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def label_reward(tmp_path):
    """Right answer: 1; plus 0.5 on odd sample indices (the demo model often answers a prompt one way)."""
    body = "    return float(sample.label in sample.response) + 0.5 * (sample.index % 2)\n"
    return write(tmp_path, "reward.py", "async def reward(args, sample):\n" + body)


@pytest.fixture
def recorded_groups(monkeypatch):
    """The group sizes the advantage estimator normalises over, per rollout."""
    seen = []
    real = advantages.group_sizes

    def spy(batch, default):
        sizes = real(batch, default)
        seen.append(list(sizes))
        return sizes

    monkeypatch.setattr(advantages, "group_sizes", spy)
    return seen


def run(tmp_path, reward, *extra: str, n_rollout: int = 1):
    dumps = str(tmp_path / "dumps" / "{rollout_id}.pt")
    argv = demo_argv(tmp_path / "run", reward, n_rollout=n_rollout)
    assert main(argv + ["--save-debug-rollout-data", dumps, *extra]) == 0
    return [load_rollout(dumps, r) for r in range(n_rollout)], rows(tmp_path / "run")


def test_a_sync_rollout_function_wrapping_the_builtin_one(tmp_path, label_reward, recorded_groups):
    fn = write(tmp_path, "wrap.py", WRAPPER)
    (r0, r1), metrics = run(tmp_path, label_reward, "--rollout-function-path", str(fn), n_rollout=2)
    rollout_rows = [r for r in metrics if "rollout/wrapped_groups" in r]
    assert [(r["rollout/wrapped_groups"], r["rollout/rollout_id_seen"]) for r in rollout_rows] == [
        (2.0, 0.0),
        (2.0, 1.0),
    ]
    assert any("train/loss" in r or any(k.startswith("train/") for k in r) for r in metrics)
    for samples in (r0, r1):
        assert [s.group_index for s in samples] == [0] * 4 + [1] * 4
        assert [s.index for s in samples] == list(range(8))
        assert all(s.reward is not None and s.response_length > 0 for s in samples)
    assert recorded_groups == [[4, 4], [4, 4]]
    assert r0[0].prompt != r1[0].prompt  # each rollout draws its own prompts


def test_an_async_rollout_function_with_uneven_groups(tmp_path, label_reward, recorded_groups):
    fn = write(tmp_path, "branch.py", BRANCHING)
    ((samples,), metrics) = run(tmp_path, label_reward, "--rollout-function-path", f"{fn}:generate_rollout")
    assert [s.group_index for s in samples] == [0] * 5 + [1] * 4
    assert [s.index for s in samples] == list(range(9))
    # The branch was rewarded by --custom-rm-path (label in response + 0.5 * (index % 2); its index is 4).
    branch = samples[4]
    assert branch.reward == float(branch.label in branch.response) + 0.0
    assert all(s.reward is not None for s in samples)
    assert all(s.response_length <= 3 for s in samples[5:])  # the second group's own sampling parameters
    assert recorded_groups == [[5, 4]]
    assert any(k.startswith("train/") for r in metrics for k in r)


def test_a_generate_function_returning_two_samples_per_call(tmp_path, label_reward, recorded_groups):
    fn = write(tmp_path, "two.py", TWO_PER_CALL)
    ((samples,), _) = run(tmp_path, label_reward, "--custom-generate-function-path", str(fn))
    assert len(samples) == 16 and [s.group_index for s in samples] == [0] * 8 + [1] * 8
    assert sum(s.metadata.get("turn") == 1 for s in samples) == 8
    assert all(s.response_length <= 4 for s in samples if s.metadata.get("turn") == 1)
    # Every sample was rewarded on its own, when its call ended: a call's two samples then shared the index
    # 4 * group + call (they are renumbered 0..15 afterwards).
    extra = [0.5 * ((j % 8) // 2 % 2) for j in range(16)]
    assert [s.reward - float(s.label in s.response) for s in samples] == extra
    assert recorded_groups == [[8, 8]]


@pytest.mark.parametrize(
    "source, needle",
    [
        ("def generate_rollout(args, rollout_id, data_source, evaluation=False):\n    return []\n",
         "returned [], not a non-empty list of groups"),
        ("def generate_rollout(args, rollout_id, data_source, evaluation=False):\n    return [[1]]\n",
         "returned group 0 as [1], not a non-empty list of Samples"),
    ],
)  # fmt: skip
def test_a_rollout_function_returning_garbage_is_named(tmp_path, capsys, label_reward, source, needle):
    fn = write(tmp_path, "bad.py", source)
    argv = demo_argv(tmp_path / "run", label_reward, 1) + ["--rollout-function-path", str(fn)]
    err = error_of(capsys, argv)
    assert f"--rollout-function-path {fn} {needle}" in err


def test_a_missing_rollout_function_is_refused_at_start(tmp_path, capsys, label_reward):
    fn = write(tmp_path, "none.py", "def other(args):\n    pass\n")
    argv = demo_argv(tmp_path / "run", label_reward, 1) + ["--rollout-function-path", str(fn)]
    err = error_of(capsys, argv)
    assert "has no function 'generate_rollout'; it defines: other" in err
