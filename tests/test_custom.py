"""``--custom-*-path`` specs resolved to callables: files, modules, dotted paths and entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from miles_core.custom import load_function
from miles_core.types import UsageError

CUSTOM = """
    from os.path import join  # imported names are not listed as candidates

    THRESHOLD = 3

    def reward(args, sample):
        return "reward"

    def other(args, sample):
        return "other"

    def _private():
        pass

    class Scorer:
        @staticmethod
        def score():
            return "score"
"""


def test_load_function_from_file(tmp_path, monkeypatch):
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "rm.py").write_text(textwrap.dedent(CUSTOM))
    assert load_function(str(tmp_path / "custom" / "rm.py"), "reward")(None, None) == "reward"
    monkeypatch.chdir(tmp_path)
    assert load_function("custom/rm.py", "reward")(None, None) == "reward"  # relative to the cwd
    assert load_function("custom/rm.py:other", "reward")(None, None) == "other"
    assert load_function("custom/rm.py:Scorer.score", "reward")() == "score"


def test_files_with_the_same_name_do_not_collide(tmp_path):
    for d, value in (("a", 1), ("b", 2)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "reward.py").write_text(f"def reward(args, sample):\n    return {value}\n")
    fa = load_function(str(tmp_path / "a" / "reward.py"), "reward")
    fb = load_function(str(tmp_path / "b" / "reward.py"), "reward")
    assert (fa(None, None), fb(None, None)) == (1, 2)
    assert fa.__module__ != fb.__module__ and fa.__module__ in sys.modules


def test_load_function_from_module(site):
    site.module("mtestpkg/__init__.py")
    site.module("mtestpkg/rewards.py", CUSTOM)
    assert load_function("mtestpkg.rewards:other", "reward")(None, None) == "other"
    assert load_function("mtestpkg.rewards.other", "reward")(None, None) == "other"
    assert load_function("mtestpkg.rewards.Scorer.score", "reward")() == "score"


def test_load_function_from_entry_point(site):
    site.module("mtest_fns.py", CUSTOM)
    site.dist("miles-test-fns", "1.0", {"miles.test_fns": {"myfn": "mtest_fns:other"}})
    assert load_function("myfn", "reward", group="miles.test_fns")(None, None) == "other"
    with pytest.raises(
        UsageError, match=r"'nofn' is not an installed miles.test_fns name \(installed: myfn\)"
    ):
        load_function("nofn", "reward", group="miles.test_fns")


def test_load_function_errors(tmp_path, site):
    site.module("mtesterr/__init__.py")
    site.module("mtesterr/rewards.py", CUSTOM)
    site.module("mtesterr/needs_dep.py", "import miles_no_such_dependency_xyz\n")
    (tmp_path / "boom.py").write_text("1 / 0\n")

    def error(spec, **kw):
        with pytest.raises(UsageError) as e:
            load_function(spec, "reward", **kw)
        return str(e.value)

    missing = tmp_path / "nowhere" / "rm.py"
    assert error(str(missing), flag="--custom-rm-path") == (
        f"--custom-rm-path {str(missing)!r}: file {str(missing)!r} does not exist; check the path."
    )
    assert "failed (ZeroDivisionError: division by zero)" in error(str(tmp_path / "boom.py"))
    msg = error("mtesterr.nomod:reward")
    assert "module 'mtesterr.nomod' cannot be imported (ModuleNotFoundError" in msg
    assert "module 'miles_no_such_top_xyz' cannot be imported" in error("miles_no_such_top_xyz.reward")
    # A module that exists but lacks a dependency is reported as such, not as "no such module".
    assert "module 'mtesterr.needs_dep' cannot be imported" in error("mtesterr.needs_dep.f")
    assert "miles_no_such_dependency_xyz" in error("mtesterr.needs_dep.f")
    assert error("mtesterr.rewards:rewrad") == (
        "custom function 'mtesterr.rewards:rewrad': 'mtesterr.rewards' has no function 'rewrad'; "
        "it defines: Scorer, other, reward."
    )
    assert error("mtesterr.rewards.THRESHOLD").endswith(
        "'THRESHOLD' is a int, not a function; point it at a function."
    )
    assert "is not a file.py, a module:function or a module.function" in error("reward")
