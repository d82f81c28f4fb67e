"""The plugin contract, checked from source: what a plugin may import and touch, and what the core must
never name. `tests/test_contract.py` runs these checks over the repository; a third-party plugin can
run them over its own package (``check_plugin_source(path, "my_plugin")``).

A plugin's runtime code imports from miles-core only `PUBLIC_MODULES`, uses no name starting with ``_``
from another package, and sets no attribute on the engine it is handed. The core's source names no
plugin distribution, package or flag.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

PUBLIC_MODULES = ("miles_core", "miles_core.api", "miles_core.hookspecs", "miles_core.types")
ENGINE_NAMES = ("engine", "eng")  # parameters that hold the rollout engine in hookimpls and strategies


def _top(module: str) -> str:
    return module.split(".")[0]


def _ours(module: str) -> bool:
    """A miles package (the core or a plugin): the contract is about these packages' private names;
    private APIs of third-party libraries (``torch._scaled_mm``) are outside it."""
    return _top(module).startswith("miles")


def check_plugin_source(path: Path, package: str) -> list[str]:
    """Contract violations in one file of plugin ``package``, as ``file:line: what`` strings."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems: list[str] = []
    foreign: set[str] = set()  # local names bound to modules of other packages

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{path}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _top(alias.name) == "miles_core" and alias.name not in PUBLIC_MODULES:
                    bad(node, f"imports {alias.name}; use miles_core.api")
                if _top(alias.name) != package and _ours(alias.name):
                    foreign.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mod = node.module
            if _top(mod) == "miles_core" and mod not in PUBLIC_MODULES:
                bad(node, f"imports from {mod}; use miles_core.api")
            if _top(mod) != package and _ours(mod):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        bad(node, f"imports private name {alias.name} from {mod}")
                    else:
                        foreign.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in foreign:
                bad(node, f"uses private name {node.value.id}.{node.attr} of another package")
        targets: Iterable[ast.AST] = ()
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ENGINE_NAMES:
                bad(t, f"sets {t.value.id}.{t.attr}; return RolloutOptions from pre_rollout instead")
    return problems


def check_plugin_package(root: Path, package: str) -> list[str]:
    """`check_plugin_source` over every module of a plugin package folder."""
    return [p for f in sorted(root.rglob("*.py")) for p in check_plugin_source(f, package)]


def core_mentions(core: Path, words: Iterable[str]) -> list[str]:
    """Places in the core's source that name any of ``words`` (plugin distributions, packages, flags),
    as ``file:line: word`` strings. Flags match whole (``--foo`` does not match ``--foo-bar``)."""
    patterns = {w: re.compile(rf"(?<![\w-]){re.escape(w)}(?![\w-])") for w in words}
    found = []
    for f in sorted(core.rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            for w, pat in patterns.items():
                if pat.search(line):
                    found.append(f"{f}:{i}: {w}")
    return found


def attribute_uses(path: Path, owners: Iterable[str]) -> set[str]:
    """Attributes read or called on ``owners`` (dotted names such as ``self.engine``) in one file."""
    owners = set(owners)
    uses = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in owners:
            uses.add(node.attr)
    return uses
