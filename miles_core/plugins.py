"""The plugin manager: core built-ins and installed ``miles.plugins`` entry points, registered alike.

Also ``configure_plugins`` (each plugin says whether it is active and registers its per-run hook object)
and the ``miles plugins`` command (what is installed, from which distribution, which hooks, whether
active).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import importlib.metadata
import io
import json
import os
import sys
from collections.abc import Iterable, Mapping

import pluggy

from miles_core import drivers, hookspecs
from miles_core.errors import UsageError
from miles_core.flags import ArgumentParser

hookimpl = pluggy.HookimplMarker("miles")

PROJECT = "miles"
ENTRY_POINT_GROUP = drivers.PLUGINS
ALLOW_ENV = "MILES_LOAD_PLUGINS"
# Core built-ins go through the same registration path as external plugins (pytest's default_plugins).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "miles_core.train.advantages",
    "miles_core.train.corrections",
    "miles_core.train.on_policy",
    "miles_core.megatron.convert",
)
CORE_DISTRIBUTION = "miles-core"


class MilesPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution and version each plugin came from, and which
    per-run hook objects each plugin registered in ``configure``."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.sources: dict[str, tuple[str | None, str | None]] = {}  # plugin name -> (dist, version)
        self.run_objects: dict[str, list[object]] = {}  # plugin name -> objects its configure registered


def core_plugin_name(module: str) -> str:
    """``miles_core.train.advantages`` -> ``core.advantages``."""
    return "core." + module.rpartition(".")[2]


def _core_version() -> str | None:
    try:
        return importlib.metadata.version(CORE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return None


def _split_names(values: Iterable[str]) -> list[str]:
    """Flatten ``["a,b", "c"]`` (or a single ``"a,b"``) into ``["a", "b", "c"]``, dropping blanks."""
    if isinstance(values, str):
        values = [values]
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _check_names(names: Iterable[str], installed: Iterable[str], where: str) -> None:
    unknown = sorted(set(names) - set(installed))
    if unknown:
        have = ", ".join(sorted(installed)) or "none"
        raise UsageError(
            f"{where} names plugin(s) {', '.join(unknown)} that are not installed; installed: {have}."
        )


def get_plugin_manager(
    disable: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    defaults: Iterable[str] = DEFAULT_PLUGINS,
    extra: Iterable[object] = (),
) -> MilesPluginManager:
    """Build the plugin manager: hookspecs, core built-ins, then allowed and not disabled entry points.

    :param disable: plugin names from ``--disable-plugins`` (comma-separated strings are split).
    :param env: environment to read ``MILES_LOAD_PLUGINS`` from (default ``os.environ``); when set, it is
        the comma-separated allow-list of entry-point names, and set but empty loads no external plugin.
    :param defaults: modules registered as core built-ins, each as ``core.<last component>``.
    :param extra: further plugin objects to register (tests, programmatic use).
    """
    env = os.environ if env is None else env
    disable = _split_names(disable)
    pm = MilesPluginManager()
    pm.add_hookspecs(hookspecs)
    for module in defaults:
        name = core_plugin_name(module)
        pm.register(importlib.import_module(module), name=name)
        pm.sources[name] = (CORE_DISTRIBUTION, _core_version())

    core_disabled = [n for n in disable if n.startswith("core.") or n in pm.sources]
    if core_disabled:
        raise UsageError(
            f"--disable-plugins {','.join(core_disabled)}: core built-ins cannot be disabled; "
            "choose another --advantage-estimator or correction flag instead."
        )
    installed = drivers.available(ENTRY_POINT_GROUP)
    _check_names(disable, installed, "--disable-plugins")
    allow = None
    if ALLOW_ENV in env:
        allow = set(_split_names([env[ALLOW_ENV]]))
        _check_names(allow, installed, ALLOW_ENV)
    wanted = [n for n in installed if n not in disable and (allow is None or n in allow)]
    for name, plugin, ep in drivers.load_plugins(wanted):
        dist, version = drivers.distribution(ep)
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as err:
            raise UsageError(
                f"plugin {name!r} (from {dist} {version}) does not match this miles-core's hooks ({err}); "
                f"upgrade it or pass --disable-plugins {name}."
            ) from err
        pm.sources[name] = (dist, version)
    for plugin in extra:
        pm.register(plugin)
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    """``pm.check_pending()``, with the error naming the plugin, the unknown hook and the likely intent."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        known = [n for n in vars(pm.hook) if not n.startswith("_") and getattr(pm.hook, n).has_spec()]
        for hook_name, caller in vars(pm.hook).items():
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.plugin is err.plugin and not impl.optionalhook:
                    close = difflib.get_close_matches(hook_name, known, n=1)
                    hint = (
                        f"did you mean {close[0]!r}?"
                        if close
                        else f"known hooks: {', '.join(sorted(known))}."
                    )
                    raise UsageError(
                        f"plugin {pm.get_name(err.plugin)!r} implements unknown hook {hook_name!r}; {hint}"
                    ) from err
        raise UsageError(f"plugin {pm.get_name(err.plugin)!r} failed validation: {err}.") from err


def add_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--disable-plugins`` so the full parser accepts what ``disabled_from_argv`` pre-parsed."""
    group = parser.add_argument_group("plugins")
    group.add_argument(
        "--disable-plugins",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="installed plugins (entry-point names, see `miles plugins`) not to load for this run.",
    )


def disabled_from_argv(argv: list[str]) -> list[str]:
    """Pre-parse ``--disable-plugins`` from a command line before the plugins' own flags exist."""
    pre = ArgumentParser(prog="miles", add_help=False)
    add_plugin_arguments(pre)
    known, _ = pre.parse_known_args(argv)
    return _split_names(known.disable_plugins)


def configure_plugins(pm: pluggy.PluginManager, args: argparse.Namespace) -> dict[str, bool | None]:
    """Call every ``configure`` hookimpl one by one and return ``{plugin name: its answer}``.

    Called one at a time (in pluggy's call order) rather than through ``pm.hook.configure`` so each answer
    and each per-run object a plugin registers is attributed to its plugin. Objects registered by an
    earlier call on the same manager are unregistered first, so configuring twice leaves one run's
    objects. A ``UsageError`` raised by a plugin propagates unchanged.
    """
    runs = getattr(pm, "run_objects", {})
    for objects in runs.values():
        for obj in objects:
            if pm.is_registered(obj):
                pm.unregister(obj)
    runs.clear()
    kwargs = {"args": args, "pm": pm}
    answers: dict[str, bool | None] = {}
    for impl in reversed(pm.hook.configure.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:  # wrappers are generators around the others; nothing to ask
            continue
        before = {id(p) for p in pm.get_plugins()}
        answers[impl.plugin_name] = impl.function(*(kwargs[a] for a in impl.argnames))
        new = [p for p in pm.get_plugins() if id(p) not in before]
        if new:
            runs[impl.plugin_name] = new
    return answers


@dataclasses.dataclass
class PluginInfo:
    """One row of ``miles plugins``."""

    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    active: bool | None  # configure's answer; None: no notion of active, or not determined


def list_plugins(pm: pluggy.PluginManager, active: dict[str, bool | None] | None = None) -> list[PluginInfo]:
    """Describe every registered plugin (blocked names excluded), in registration order. A plugin's hooks
    are its own, those of the per-run objects it registered, and those its run classes declare (a class
    defined in the plugin's module with hookimpls), so an idle plugin still shows what it can do."""
    sources = getattr(pm, "sources", {})
    runs = getattr(pm, "run_objects", {})
    owned = {id(o) for objects in runs.values() for o in objects}
    active = active or {}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None or id(plugin) in owned:  # a blocked name, or a run object (listed with its owner)
            continue
        dist, version = sources.get(name, (None, None))
        hooks = {h.name for p in [plugin, *runs.get(name, [])] for h in pm.get_hookcallers(p) or []}
        hooks |= _declared_run_hooks(plugin)
        infos.append(PluginInfo(name, dist, version, sorted(hooks), active.get(name)))
    return infos


def _declared_run_hooks(plugin: object) -> set[str]:
    """Hook names implemented by classes defined in a plugin module (its per-run hook objects)."""
    marker = f"{PROJECT}_impl"
    module = getattr(plugin, "__name__", None)
    return (
        {
            attr
            for cls in vars(plugin).values()
            if isinstance(cls, type) and cls.__module__ == module
            for attr, value in vars(cls).items()
            if hasattr(value, marker)
        }
        if isinstance(module, str) and hasattr(plugin, "__file__")
        else set()
    )


def format_plugins(infos: list[PluginInfo], active_known: bool = True) -> str:
    """A fixed-width table: name, distribution, version, active (yes/no/-, ``?`` if unknown), hooks."""
    header = ("NAME", "DISTRIBUTION", "VERSION", "ACTIVE", "HOOKS")
    words = {True: "yes", False: "no", None: "-"}
    rows = [
        (
            i.name,
            i.distribution or "-",
            i.version or "-",
            words[i.active] if active_known else "?",
            ", ".join(i.hooks) or "-",
        )
        for i in infos
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    lines = ["  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]) for r in [header, *rows]]
    return "\n".join(lines)


def _default_activity(pm: pluggy.PluginManager) -> dict[str, bool | None] | None:
    """Parse an empty command line with the real parser and ask each plugin if it is active, if possible."""
    try:
        from miles_core.args import build_parser
    except ImportError as err:
        if err.name != "miles_core.args":  # a real bug inside args.py must not be hidden
            raise
        return None
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = build_parser(pm).parse_args([])
        except (SystemExit, UsageError):  # required flags without defaults: activity cannot be judged
            return None
    try:
        return configure_plugins(pm, args)
    except UsageError as err:
        print(f"warning: cannot tell which plugins are active: {err}", file=sys.stderr)
        return None


def plugins_main(argv: list[str]) -> int:
    """``miles plugins [--json] [--disable-plugins a,b]``: list installed plugins."""
    parser = ArgumentParser(prog="miles plugins", description="List installed miles plugins.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table.")
    add_plugin_arguments(parser)
    ns = parser.parse_args(argv)
    pm = get_plugin_manager(disable=ns.disable_plugins, defaults=DEFAULT_PLUGINS)
    active = _default_activity(pm)
    infos = list_plugins(pm, active)
    if ns.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
    else:
        print(format_plugins(infos, active_known=active is not None))
    return 0
