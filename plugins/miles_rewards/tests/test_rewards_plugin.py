"""Tests of the miles-rewards plugin: its hookimpls and its entry points."""

from __future__ import annotations

import argparse
import importlib
import inspect
from pathlib import Path

import pytest
from miles_rewards import plugin

from miles_core.args import parse_args
from miles_core.plugins import configure_plugins, get_plugin_manager
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


def configured(*flags: str) -> bool:
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[plugin])
    args = parse_args(list(flags), pm)
    return configure_plugins(pm, args)["miles_rewards.plugin"]


def test_configure() -> None:
    with pytest.raises(UsageError, match="--rm-type remote_rm needs --rm-url"):
        configured("--rm-type", "remote_rm")
    assert configured("--rm-type", "remote_rm", "--rm-url", "http://127.0.0.1:1/r") is True
    assert configured("--rm-type", "math") is True
    assert configured("--rm-type", "boxed_f1") is True
    assert configured("--rm-type", "my_custom") is False
    assert configured() is False
    with pytest.raises(UsageError, match="--math-equivalence-timeout"):
        configured("--rm-type", "math", "--math-equivalence-timeout", "0")


def test_hookimpls_match_the_core_specs() -> None:
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[plugin])  # check_pending runs here
    assert set(configure_plugins(pm, parse_args([], pm))) >= {"miles_rewards.plugin"}


def test_entry_points_resolve_to_async_rewards() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert (project["name"], project["version"]) == ("miles-rewards", "0.1.0")
    assert project["entry-points"]["miles.plugins"] == {"rewards": "miles_rewards.plugin"}
    rewards = project["entry-points"]["miles.rewards"]
    assert sorted(rewards) == sorted(plugin.reward_names())
    for target in rewards.values():
        module, func = target.split(":")
        fn = getattr(importlib.import_module(module), func)
        assert inspect.iscoroutinefunction(fn), target
        assert list(inspect.signature(fn).parameters) == ["args", "sample"], target


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--rm-url", "file:///etc/passwd"], ["--rm-url file:///etc/passwd", "http(s)://"]),
        (["--rm-url", "ftp://h/r"], ["not an http:// or https:// URL"]),
        (["--rm-url", "https://h:8443/r?key=k"], None),
        (["--rm-url", "http://user:pw@h/r"], ["--rm-url http://h/r carries a user name or password"]),
        (["--rm-url", "http://h/r", "--rm-max-retries", "11"], ["--rm-max-retries", "between 0 and 10"]),
        (["--rm-url", "http://h/r", "--rm-max-retries", "-1"], ["--rm-max-retries"]),
        (["--rm-url", "http://h/r", "--rm-retry-backoff", "31"], ["--rm-retry-backoff", "30"]),
        (["--rm-url", "http://h/r", "--rm-request-timeout", "0"], ["--rm-request-timeout"]),
    ],
)
def test_configure_checks_the_remote_flags(flags: list[str], words: list[str] | None) -> None:
    if words is None:  # accepted
        assert configured("--rm-type", "remote_rm", *flags) is True
        return
    with pytest.raises(UsageError) as info:
        configured("--rm-type", "remote_rm", *flags)
    for word in words:
        assert word in str(info.value)
