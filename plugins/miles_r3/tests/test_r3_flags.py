"""The R3 flags exist only with the plugin registered, show up in `miles train --help`, and `configure`
derives --use-routing-replay from --use-rollout-routing-replay and reports whether R3 is active."""

from __future__ import annotations

import miles_r3.plugin as r3_plugin
import pytest
from r3_helpers import plugin_manager

import miles_core.plugins
from miles_core import cli
from miles_core.args import build_parser, parse_args
from miles_core.plugins import configure_plugins, get_plugin_manager

FLAGS = ("--use-rollout-routing-replay", "--use-routing-replay", "--record-routing-mismatch")


def _options(pm) -> set[str]:
    return {o for a in build_parser(pm)._actions for o in a.option_strings}


def test_flags_absent_without_plugin_and_present_with_it():
    assert not set(FLAGS) & _options(plugin_manager(with_r3=False))
    assert set(FLAGS) <= _options(plugin_manager(with_r3=True))
    group = next(g for g in build_parser(plugin_manager())._action_groups if g.title == "r3")
    negated = {"--no-" + f.removeprefix("--") for f in FLAGS}  # on/off flags take --no-FLAG too
    assert {o for a in group._group_actions for o in a.option_strings} == set(FLAGS) | negated


def test_configure_implies_routing_replay_and_reports_activity():
    pm = plugin_manager()
    idle = parse_args([], pm)
    assert configure_plugins(pm, idle)[pm.get_name(r3_plugin)] is False
    args = parse_args(["--use-rollout-routing-replay"], pm)
    assert configure_plugins(pm, args)[pm.get_name(r3_plugin)] is True
    assert args.use_routing_replay is True
    measure = parse_args(["--record-routing-mismatch"], pm)
    assert configure_plugins(pm, measure)[pm.get_name(r3_plugin)] is True
    assert measure.use_routing_replay is False


@pytest.mark.parametrize("with_r3", [True, False])
def test_miles_train_help_lists_r3_flags_only_with_plugin(monkeypatch, capsys, with_r3):
    def only_core_and_r3(**kw):
        kw["env"] = {"MILES_LOAD_PLUGINS": ""}  # ignore whatever else is installed in this environment
        return get_plugin_manager(**kw, extra=[r3_plugin] if with_r3 else [])

    monkeypatch.setattr(miles_core.plugins, "get_plugin_manager", only_core_and_r3)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in FLAGS:
        assert (flag in out) is with_r3
    assert ("r3:" in out) is with_r3
