"""Named implementations through stevedore: real dist-info entry points, unknown names, import failures."""

from __future__ import annotations

import asyncio

import pytest

from miles_core import drivers
from miles_core.custom import get_generate_fn
from miles_core.protocols import AdvantageEstimator, RolloutBackend, TrainBackend
from miles_core.types import UsageError


@pytest.fixture
def nothing_installed(monkeypatch):
    """As if no distribution registered anything (e.g. miles-rewards not installed)."""
    monkeypatch.setattr(drivers, "entry_points", lambda group: [])


BACKENDS = """
    async def reward(args, sample):
        return 1.0

    async def generate(args, sample, sampling_params):
        return sample

    class Engine:
        in_process = True
        weight_version = 0
        generated_tokens = 0

        @classmethod
        def from_args(cls, args, model, tokenizer): ...
        async def generate(self, input_ids, sampling_params, rid=None): ...
        def set_rollout_options(self, options): ...
        def reseed(self, seed): ...
        def update_weights(self, named_tensors, version):
            self.weight_version = version
        def abort(self, rid=None): ...
        def pause_generation(self, mode="in_place"): ...
        def continue_generation(self): ...
        def metrics(self): ...
        def close(self): ...

    class Trainer:
        def train(self, rollout_id, batch): ...
        def named_weights(self): ...
        def save_model(self, path, tokenizer_src): ...
        def state_dict(self): ...
        def load_state_dict(self, state): ...

    class Estimator:
        def advantages(self, args, batch): ...
        def policy_log_ratio(self, log_probs, old_log_probs, loss_mask, lengths): ...
"""


@pytest.fixture
def fake_dist(site):
    site.module("mtest_backends.py", BACKENDS)
    site.dist(
        "miles-test-backends",
        "1.0",
        {
            "miles.rewards": {"fake_rm": "mtest_backends:reward", "other_rm": "mtest_backends:reward"},
            "miles.generate": {"fake_gen": "mtest_backends:generate"},
            "miles.rollout_backends": {"fake_engine": "mtest_backends:Engine"},
            "miles.train_backends": {"fake_trainer": "mtest_backends:Trainer"},
            "miles.advantages": {"fake_est": "mtest_backends:Estimator"},
        },
    )
    return site


def test_loads_each_group_through_stevedore(fake_dist):
    mod = pytest.importorskip("mtest_backends")
    assert {"fake_rm", "other_rm"} <= set(drivers.available("miles.rewards"))
    assert drivers.get_reward_fn("fake_rm") is mod.reward
    assert asyncio.run(drivers.get_reward_fn("fake_rm")(None, None)) == 1.0
    assert get_generate_fn("fake_gen") is mod.generate
    assert drivers.get_rollout_backend("fake_engine") is mod.Engine
    assert drivers.get_train_backend("fake_trainer") is mod.Trainer
    assert isinstance(drivers.get_estimator("fake_est"), mod.Estimator)  # a class is instantiated
    assert isinstance(mod.Engine(), RolloutBackend) and isinstance(mod.Trainer(), TrainBackend)
    assert isinstance(mod.Estimator(), AdvantageEstimator)
    assert not isinstance(mod.Engine(), TrainBackend) and not isinstance(mod.Trainer(), RolloutBackend)


def test_generate_fn_accepts_path_specs(tmp_path):
    path = tmp_path / "gen.py"
    path.write_text("async def generate(args, sample, sampling_params):\n    return 'mine'\n")
    fn = get_generate_fn(str(path))
    assert asyncio.run(fn(None, None, {})) == "mine"
    with pytest.raises(
        UsageError, match=r"^--custom-generate-function-path '.*nope.py': file .* does not exist"
    ):
        get_generate_fn(str(tmp_path / "nope.py"))


def test_missing_name_lists_what_is_installed_and_names_no_distribution(nothing_installed):
    # The core never knows which distribution provides a name: it lists what is installed.
    with pytest.raises(UsageError) as e:
        drivers.get_reward_fn("math")
    assert str(e.value) == "unknown --rm-type 'math'; installed: none."
    with pytest.raises(UsageError, match=r"^unknown --rollout-backend 'sglang'; installed: none\.$"):
        drivers.get_rollout_backend("sglang")


def test_unknown_name_lists_installed(fake_dist):
    with pytest.raises(UsageError, match=r"^unknown --rm-type 'foo'; installed: .*fake_rm.*other_rm"):
        drivers.get_reward_fn("foo")
    with pytest.raises(UsageError, match=r"^unknown --custom-generate-function-path 'nogen'; installed: "):
        get_generate_fn("nogen")


def test_unknown_name_with_nothing_installed(nothing_installed):
    with pytest.raises(UsageError) as e:
        drivers.get_train_backend("jax")
    assert str(e.value) == "unknown --train-backend 'jax'; installed: none."


def test_driver_import_failure(site):
    site.module("mtest_broken_backend.py", "import miles_no_such_dependency_xyz\n")
    site.dist(
        "miles-test-broken",
        "1.0",
        {
            "miles.rollout_backends": {"broken": "mtest_broken_backend:Engine"},
        },
    )
    with pytest.raises(UsageError) as e:
        drivers.get_rollout_backend("broken")
    msg = str(e.value)
    assert msg.startswith("--rollout-backend broken failed to import (ModuleNotFoundError")
    assert "miles_no_such_dependency_xyz" in msg and msg.endswith(
        "fix or reinstall the distribution that provides it."
    )


def test_two_distributions_with_one_name(site):
    site.module("mtest_dup.py", BACKENDS)
    site.dist("miles-test-dup1", "1.0", {"miles.rewards": {"dup_rm": "mtest_dup:reward"}})
    site.dist("miles-test-dup2", "1.0", {"miles.rewards": {"dup_rm": "mtest_dup:generate"}})
    assert drivers.available("miles.rewards").count("dup_rm") == 1
    with pytest.raises(
        UsageError, match="^--rm-type dup_rm: multiple implementations .*uninstall all but one"
    ):
        drivers.get_reward_fn("dup_rm")
