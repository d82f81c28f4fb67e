"""The hook contract reads like documentation: every hook and each of its arguments is documented."""

from __future__ import annotations

import inspect
import re

import pytest

from miles_core import hookspecs

SPECS = {
    name: fn
    for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, "miles_spec")  # set by pluggy.HookspecMarker("miles")
}

# DESIGN.md's hook table: name -> its arguments (configure also gets the plugin manager, with which an
# active plugin registers its per-run object, as DESIGN.md asks).
DESIGN_HOOKS = {
    "add_arguments": ["parser"],
    "configure": ["args", "pm"],
    "pre_rollout": ["args", "rollout_id", "engine"],
    "on_route_record": ["args", "sample", "routed_experts"],
    "pre_forward": ["args", "model", "batch", "stage"],
    "advantage": ["args", "batch"],
    "loss_correction": ["args", "terms"],
    "post_step": ["args", "step", "model", "metrics"],
}


def test_design_hooks_exist_with_their_arguments():
    for name, argnames in DESIGN_HOOKS.items():
        assert name in SPECS, f"hook {name} of DESIGN.md is missing from hookspecs.py"
        assert list(inspect.signature(SPECS[name]).parameters) == argnames


def test_advantage_is_firstresult():
    assert SPECS["advantage"].miles_spec["firstresult"] is True


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_is_documented(name):
    doc = inspect.getdoc(SPECS[name])
    assert doc, f"hook {name} has no docstring"
    assert doc.splitlines()[0].strip(), f"hook {name}'s docstring lacks a one-line summary"
    documented = re.findall(r"^:param (\w+):", doc, flags=re.MULTILINE)
    assert documented == list(inspect.signature(SPECS[name]).parameters), (
        f"hook {name}: every argument needs a ':param name:' line, in order"
    )
    assert re.search(r"^:returns:", doc, flags=re.MULTILINE), f"hook {name} lacks ':returns:'"
    assert "Called" in doc, f"hook {name} does not say when and by which process it is called"
