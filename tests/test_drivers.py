"""Named implementations through stevedore: real dist-info entry points, install hints, unknown names."""

from __future__ import annotations

import asyncio

import pytest

from miles_core import drivers
from miles_core.protocols import RolloutEngine, TrainBackend
from miles_core.types import UsageError


@pytest.fixture
def nothing_installed(monkeypatch):
    """As if no distribution registered anything (e.g. miles-rewards not installed)."""
    monkeypatch.setattr(drivers, "_entry_points", lambda group: [])


BACKENDS = """
    async def reward(args, sample):
        return 1.0

    async def generate(args, sample, sampling_params):
        return sample

    class Engine:
        weight_version = 0

        def update_weights(self, named_tensors, version):
            self.weight_version = version

    class Trainer:
        def compute_log_probs(self, batch, stage): ...
        def train(self, rollout_id, batch): ...
        def named_weights(self): ...
        def save(self, path): ...
        def load(self, path): ...
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
        },
    )
    return site


def test_loads_each_group_through_stevedore(fake_dist):
    mod = pytest.importorskip("mtest_backends")
    assert {"fake_rm", "other_rm"} <= set(drivers.available("miles.rewards"))
    assert drivers.get_reward_fn("fake_rm") is mod.reward
    assert asyncio.run(drivers.get_reward_fn("fake_rm")(None, None)) == 1.0
    assert drivers.get_generate_fn("fake_gen") is mod.generate
    assert drivers.get_rollout_backend("fake_engine") is mod.Engine
    assert drivers.get_train_backend("fake_trainer") is mod.Trainer
    assert isinstance(mod.Engine(), RolloutEngine) and isinstance(mod.Trainer(), TrainBackend)
    assert not isinstance(mod.Engine(), TrainBackend)


def test_generate_fn_accepts_path_specs(tmp_path):
    path = tmp_path / "gen.py"
    path.write_text("async def generate(args, sample, sampling_params):\n    return 'mine'\n")
    fn = drivers.get_generate_fn(str(path))
    assert asyncio.run(fn(None, None, {})) == "mine"
    with pytest.raises(
        UsageError, match=r"^--custom-generate-function-path '.*nope.py': file .* does not exist"
    ):
        drivers.get_generate_fn(str(tmp_path / "nope.py"))


def test_missing_plugin_names_the_distribution_to_install(nothing_installed):
    with pytest.raises(UsageError) as e:
        drivers.get_reward_fn("math")
    assert str(e.value) == (
        "--rm-type math needs the miles-rewards plugin, which is not installed: "
        "pip install miles-rewards (from the repo: pip install -e plugins/miles_rewards)."
    )
    with pytest.raises(UsageError) as e:
        drivers.get_rollout_backend("sglang")
    assert str(e.value) == (
        "--rollout-backend sglang needs miles-core's sglang extra, which is not installed: "
        "pip install 'miles-core[sglang]' (from the repo: pip install -e '.[sglang]')."
    )
    with pytest.raises(UsageError, match="^--train-backend megatron needs miles-core's megatron extra"):
        drivers.get_train_backend("megatron")


def test_unknown_name_lists_installed(fake_dist):
    with pytest.raises(UsageError, match=r"^unknown --rm-type 'foo'; installed: .*fake_rm.*other_rm"):
        drivers.get_reward_fn("foo")
    with pytest.raises(UsageError, match=r"^unknown --custom-generate-function-path 'nogen'; installed: "):
        drivers.get_generate_fn("nogen")


def test_unknown_name_with_nothing_installed(nothing_installed):
    with pytest.raises(UsageError) as e:
        drivers.get_train_backend("jax")
    assert str(e.value) == "unknown --train-backend 'jax'; installed: none."


def test_driver_import_failure(site, monkeypatch):
    site.module("mtest_broken_backend.py", "import miles_no_such_dependency_xyz\n")
    site.dist(
        "miles-test-broken",
        "1.0",
        {
            "miles.rollout_backends": {
                "broken": "mtest_broken_backend:Engine",
                "known": "mtest_broken_backend:E",
            }
        },
    )
    with pytest.raises(UsageError) as e:
        drivers.get_rollout_backend("broken")
    msg = str(e.value)
    assert msg.startswith("--rollout-backend broken failed to import (ModuleNotFoundError")
    assert "miles_no_such_dependency_xyz" in msg and msg.endswith(
        "reinstall the distribution that provides it."
    )
    # A name the project knows the provider of gets the install command instead.
    monkeypatch.setitem(drivers.KNOWN_PROVIDERS["miles.rollout_backends"], "known", "miles-core[known]")
    with pytest.raises(UsageError, match=r"pip install 'miles-core\[known\]' \(from the repo: .*\)\.$"):
        drivers.get_rollout_backend("known")


def test_two_distributions_with_one_name(site):
    site.module("mtest_dup.py", BACKENDS)
    site.dist("miles-test-dup1", "1.0", {"miles.rewards": {"dup_rm": "mtest_dup:reward"}})
    site.dist("miles-test-dup2", "1.0", {"miles.rewards": {"dup_rm": "mtest_dup:generate"}})
    assert drivers.available("miles.rewards").count("dup_rm") == 1
    with pytest.raises(
        UsageError, match="^--rm-type dup_rm: multiple implementations .*uninstall all but one"
    ):
        drivers.get_reward_fn("dup_rm")
