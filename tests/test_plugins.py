"""Plugin manager, per-run plugin objects and `miles plugins`, through real dist-info entry points.

Each test writes tiny distributions (``NAME-VERSION.dist-info`` with ``entry_points.txt``) and modules
into a temporary directory on ``sys.path``, so discovery runs through ``importlib.metadata`` for real.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest

from miles_core import plugins
from miles_core.plugins import (
    configure_plugins,
    format_plugins,
    get_plugin_manager,
    list_plugins,
    plugins_main,
)
from miles_core.types import UsageError

PLUGIN_A = """
    from miles_core.plugins import hookimpl

    @hookimpl
    def configure(args):
        return True

    @hookimpl
    def pre_rollout(args, rollout_id):
        pass
"""
PLUGIN_B = """
    from miles_core.plugins import hookimpl

    @hookimpl
    def configure(args):
        return False
"""


@pytest.fixture
def two_plugins(site):
    site.module("mtest_a.py", PLUGIN_A)
    site.module("mtest_b.py", PLUGIN_B)
    site.dist("miles-test-a", "1.2.3", {"miles.plugins": {"ta": "mtest_a"}})
    site.dist("miles-test-b", "0.4", {"miles.plugins": {"tb": "mtest_b"}})
    return site


def test_entry_point_plugin_is_registered_with_its_distribution(two_plugins):
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": "ta,tb"}, defaults=())
    assert pm.get_plugin("ta") is sys.modules["mtest_a"]
    assert pm.sources["ta"] == ("miles-test-a", "1.2.3")
    assert pm.sources["tb"] == ("miles-test-b", "0.4")
    assert sorted(pm.hook.configure(args=argparse.Namespace(), pm=pm)) == [False, True]


def test_allow_list(two_plugins):
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": " ta "}, defaults=())
    assert pm.has_plugin("ta") and not pm.has_plugin("tb")
    # Set but empty: no external plugin at all.
    assert get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, defaults=()).list_name_plugin() == []
    # Unset: everything installed.
    pm = get_plugin_manager(env={}, defaults=())
    assert pm.has_plugin("ta") and pm.has_plugin("tb")


def test_disable_plugins(two_plugins):
    pm = get_plugin_manager(disable=["tb"], env={}, defaults=())
    assert pm.has_plugin("ta") and not pm.has_plugin("tb")
    pm = get_plugin_manager(
        disable="ta,tb", env={}, defaults=()
    )  # one comma-separated string, as argparse gives
    assert not pm.has_plugin("ta") and not pm.has_plugin("tb")


@pytest.mark.parametrize(
    "kwargs, where",
    [
        ({"disable": ["nope"], "env": {}}, "--disable-plugins"),
        ({"env": {"MILES_LOAD_PLUGINS": "ta,nope"}}, "MILES_LOAD_PLUGINS"),
    ],
)
def test_unknown_plugin_name_lists_installed(two_plugins, kwargs, where):
    with pytest.raises(UsageError, match=where) as e:
        get_plugin_manager(defaults=(), **kwargs)
    msg = str(e.value)
    assert "nope" in msg and "installed:" in msg and "ta" in msg and "tb" in msg


def test_core_defaults_register_like_plugins_and_cannot_be_disabled(site):
    site.module("mtestcore/__init__.py")
    site.module("mtestcore/advantages.py", PLUGIN_A)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, defaults=("mtestcore.advantages",))
    assert pm.get_plugin("core.advantages") is sys.modules["mtestcore.advantages"]
    assert pm.sources["core.advantages"][0] == "miles-core"
    with pytest.raises(UsageError, match="core built-ins cannot be disabled"):
        get_plugin_manager(disable=["core.advantages"], env={}, defaults=("mtestcore.advantages",))


def test_misspelt_hookimpl_fails_loudly(site):
    site.module(
        "mtest_typo.py",
        """
        from miles_core.plugins import hookimpl

        @hookimpl
        def pre_rolout(args):
            pass
        """,
    )
    site.dist("miles-typo", "1.0", {"miles.plugins": {"typo": "mtest_typo"}})
    with pytest.raises(UsageError) as e:
        get_plugin_manager(env={"MILES_LOAD_PLUGINS": "typo"}, defaults=())
    assert str(e.value) == "plugin 'typo' implements unknown hook 'pre_rolout'; did you mean 'pre_rollout'?"


def test_hookimpl_with_unknown_argument_is_a_usage_error(site):
    site.module(
        "mtest_badarg.py",
        """
        from miles_core.plugins import hookimpl

        @hookimpl
        def pre_rollout(args, rollout):
            pass
        """,
    )
    site.dist("miles-badarg", "2.0", {"miles.plugins": {"badarg": "mtest_badarg"}})
    with pytest.raises(UsageError, match=r"plugin 'badarg' \(from miles-badarg 2.0\) does not match") as e:
        get_plugin_manager(env={"MILES_LOAD_PLUGINS": "badarg"}, defaults=())
    assert "rollout" in str(e.value)


def test_plugin_import_error_names_plugin_distribution_and_fix(two_plugins):
    two_plugins.module("mtest_broken.py", "import miles_no_such_dependency_xyz\n")
    two_plugins.dist("miles-broken", "0.1", {"miles.plugins": {"broken": "mtest_broken"}})
    with pytest.raises(UsageError) as e:
        get_plugin_manager(env={}, defaults=())
    msg = str(e.value)
    assert msg.startswith("plugin 'broken' (from miles-broken 0.1) failed to import (ModuleNotFoundError")
    assert "miles_no_such_dependency_xyz" in msg
    assert msg.endswith("reinstall it or pass --disable-plugins broken.")
    # The fix the message suggests works.
    assert get_plugin_manager(disable=["broken"], env={}, defaults=()).has_plugin("ta")


def test_configure_plugins_attributes_each_answer(two_plugins):
    err = UsageError("--foo needs --bar; pass --bar.")

    class Quiet:
        @plugins.hookimpl
        def configure(self):  # accepts no argument at all: pluggy allows any subset
            return None

    class Raises:
        @plugins.hookimpl
        def configure(self, args):
            raise err

    class NoConfigure:
        @plugins.hookimpl
        def post_step(self, metrics):
            pass

    env = {"MILES_LOAD_PLUGINS": "ta,tb"}
    pm = get_plugin_manager(env=env, defaults=(), extra=[Quiet(), NoConfigure()])
    answers = configure_plugins(pm, argparse.Namespace())
    named = {k: v for k, v in answers.items() if k in ("ta", "tb")}
    assert named == {"ta": True, "tb": False}
    assert sorted(answers.values(), key=str) == [False, None, True]  # Quiet answered None; NoConfigure absent
    assert len(answers) == 3

    pm = get_plugin_manager(env=env, defaults=(), extra=[Raises()])
    with pytest.raises(UsageError) as e:
        configure_plugins(pm, argparse.Namespace())
    assert e.value is err


def test_list_and_format_plugins(two_plugins):
    pm = get_plugin_manager(disable=["tb"], env={"MILES_LOAD_PLUGINS": "ta,tb"}, defaults=())
    infos = list_plugins(pm, {"ta": True})
    assert [(i.name, i.distribution, i.version, i.hooks, i.active) for i in infos] == [
        ("ta", "miles-test-a", "1.2.3", ["configure", "pre_rollout"], True)
    ]
    table = format_plugins(infos).splitlines()
    assert table[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "ACTIVE", "HOOKS"]
    assert table[1].split() == ["ta", "miles-test-a", "1.2.3", "yes", "configure,", "pre_rollout"]
    assert format_plugins(infos, active_known=False).splitlines()[1].split()[3] == "?"


def _fake_args_module(monkeypatch, required: bool = False) -> None:
    def build_parser(pm):
        parser = argparse.ArgumentParser()
        parser.add_argument("--hf-checkpoint", required=required)
        pm.hook.add_arguments(parser=parser)
        return parser

    module = types.ModuleType("miles_core.args")
    module.build_parser = build_parser
    monkeypatch.setitem(sys.modules, "miles_core.args", module)


def test_plugins_main_table_and_json(two_plugins, monkeypatch, capsys):
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", ())
    monkeypatch.setenv("MILES_LOAD_PLUGINS", "ta,tb")
    _fake_args_module(monkeypatch)
    assert plugins_main([]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["ta"][:4] == ["ta", "miles-test-a", "1.2.3", "yes"]
    assert rows["tb"][:4] == ["tb", "miles-test-b", "0.4", "no"]

    assert plugins_main(["--json", "--disable-plugins", "tb"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == [
        {
            "name": "ta",
            "distribution": "miles-test-a",
            "version": "1.2.3",
            "hooks": ["configure", "pre_rollout"],
            "active": True,
        }
    ]


@pytest.mark.parametrize("how", ["no args module", "required flags"])
def test_plugins_main_shows_unknown_activity(two_plugins, monkeypatch, capsys, how):
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", ())
    monkeypatch.setenv("MILES_LOAD_PLUGINS", "ta")
    if how == "no args module":
        monkeypatch.setitem(sys.modules, "miles_core.args", None)  # import fails as if args.py did not exist
    else:
        _fake_args_module(monkeypatch, required=True)
    assert plugins_main([]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1].split()[3] == "?"
    assert out.err == ""  # argparse's complaint about the missing flag is swallowed


PLUGIN_RUN = """
    from miles_core.plugins import hookimpl

    @hookimpl
    def configure(args, pm):
        if args.on:
            pm.register(Run(args))
        return args.on

    class Run:
        def __init__(self, args):
            self.args = args

        @hookimpl
        def post_step(self, metrics):
            metrics["run_of"] = self.args.tag
"""


def test_active_plugin_registers_a_per_run_object(site):
    site.module("mtest_run.py", PLUGIN_RUN)
    site.dist("miles-test-run", "1.0", {"miles.plugins": {"runner": "mtest_run"}})
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": "runner"}, defaults=())
    # Idle: nothing registered, so its run hooks never fire; `miles plugins` still shows them.
    assert configure_plugins(pm, argparse.Namespace(on=False, tag="a")) == {"runner": False}
    metrics: dict = {}
    pm.hook.post_step(args=None, step=1, model=None, metrics=metrics)
    assert metrics == {}
    assert list_plugins(pm)[0].hooks == ["configure", "post_step"]
    # Active: the run object carries the run's own state; a second configure replaces it.
    assert configure_plugins(pm, argparse.Namespace(on=True, tag="a")) == {"runner": True}
    assert configure_plugins(pm, argparse.Namespace(on=True, tag="b")) == {"runner": True}
    pm.hook.post_step(args=None, step=1, model=None, metrics=metrics)
    assert metrics == {"run_of": "b"}
    assert [type(o).__name__ for o in pm.run_objects["runner"]] == ["Run"]
    infos = list_plugins(pm, {"runner": True})
    assert [(i.name, i.hooks) for i in infos] == [("runner", ["configure", "post_step"])]
