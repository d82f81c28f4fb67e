"""Tests of the miles-rewards plugin: its hookimpls and its entry points."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
from miles_rewards import plugin

from miles_core import hookspecs
from miles_core.types import UsageError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_add_arguments_defaults_and_values() -> None:
    parser = argparse.ArgumentParser()
    plugin.add_arguments(parser=parser)
    args = parser.parse_args([])
    assert (args.rm_url, args.rm_max_retries, args.rm_retry_backoff) == (None, 3, 0.5)
    assert (args.rm_request_timeout, args.math_equivalence_timeout) == (30.0, 2.0)
    args = parser.parse_args(["--rm-url", "http://127.0.0.1:9/x", "--rm-max-retries", "5"])
    assert args.rm_url == "http://127.0.0.1:9/x" and args.rm_max_retries == 5
    assert any(g.title == "rewards" for g in parser._action_groups)


def test_configure() -> None:
    with pytest.raises(UsageError, match="--rm-type remote_rm needs --rm-url"):
        plugin.configure(args=SimpleNamespace(rm_type="remote_rm", rm_url=None))
    assert plugin.configure(args=SimpleNamespace(rm_type="remote_rm", rm_url="http://127.0.0.1:1/r")) is True
    assert plugin.configure(args=SimpleNamespace(rm_type="math")) is True
    assert plugin.configure(args=SimpleNamespace(rm_type="boxed_f1")) is True
    assert plugin.configure(args=SimpleNamespace(rm_type="my_custom")) is False
    assert plugin.configure(args=SimpleNamespace()) is False
    with pytest.raises(UsageError, match="--math-equivalence-timeout"):
        plugin.configure(args=SimpleNamespace(rm_type="math", math_equivalence_timeout=0.0))


def test_hookimpls_match_the_core_specs() -> None:
    pm = pluggy.PluginManager("miles")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()  # a misspelt hook or argument fails here
    parser = argparse.ArgumentParser()
    pm.hook.add_arguments(parser=parser)
    assert pm.hook.configure(args=parser.parse_args([])) == [False]


def test_entry_points_resolve_to_async_rewards() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert (project["name"], project["version"]) == ("miles-rewards", "0.1.0")
    assert project["entry-points"]["miles.plugins"] == {"rewards": "miles_rewards.plugin"}
    rewards = project["entry-points"]["miles.rewards"]
    assert sorted(rewards) == sorted(plugin.REWARD_NAMES)
    for target in rewards.values():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        assert inspect.iscoroutinefunction(fn), target
        assert list(inspect.signature(fn).parameters) == ["args", "sample"], target
