"""The plugin manager: core built-ins and installed ``miles.plugins`` entry points, registered alike.

Also the ``miles plugins`` command (what is installed, from which distribution, which hooks, whether
active) and ``load_function``, which resolves every ``--custom-*-path`` spec to a callable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pluggy

from miles_core import hookspecs
from miles_core.types import UsageError

hookimpl = pluggy.HookimplMarker("miles")

PROJECT = "miles"
ENTRY_POINT_GROUP = "miles.plugins"
ALLOW_ENV = "MILES_LOAD_PLUGINS"
# Core built-ins go through the same registration path as external plugins (pytest's default_plugins).
DEFAULT_PLUGINS: tuple[str, ...] = ("miles_core.train.advantages", "miles_core.train.corrections")
CORE_DISTRIBUTION = "miles-core"


class MilesPluginManager(pluggy.PluginManager):
    """A pluggy manager that remembers which distribution and version each plugin came from."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.sources: dict[str, tuple[str | None, str | None]] = {}  # plugin name -> (dist, version)


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
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    installed = [ep.name for ep in eps]
    _check_names(disable, installed, "--disable-plugins")
    allow = None
    if ALLOW_ENV in env:
        allow = set(_split_names([env[ALLOW_ENV]]))
        _check_names(allow, installed, ALLOW_ENV)
    for ep in eps:
        if ep.name in disable or (allow is not None and ep.name not in allow):
            continue
        _register_entry_point(pm, ep)
    for plugin in extra:
        pm.register(plugin)
    _check_pending(pm)
    return pm


def _register_entry_point(pm: MilesPluginManager, ep: importlib.metadata.EntryPoint) -> None:
    dist = ep.dist.name if ep.dist else None
    version = ep.dist.version if ep.dist else None
    where = f"plugin {ep.name!r} (from {dist} {version})" if dist else f"plugin {ep.name!r}"
    try:
        plugin = ep.load()
    except Exception as err:  # any import-time failure of third-party code: name it, never a traceback
        raise UsageError(
            f"{where} failed to import ({type(err).__name__}: {err}); "
            f"reinstall it or pass --disable-plugins {ep.name}."
        ) from err
    if pm.get_plugin(ep.name) is not None:
        raise UsageError(
            f"two installed distributions register a plugin named {ep.name!r} ({pm.sources[ep.name][0]} and "
            f"{dist}); uninstall one of them."
        )
    try:
        pm.register(plugin, name=ep.name)
    except pluggy.PluginValidationError as err:
        raise UsageError(
            f"{where} does not match this miles-core's hooks ({err}); "
            f"upgrade it or pass --disable-plugins {ep.name}."
        ) from err
    pm.sources[ep.name] = (dist, version)


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
    pre = argparse.ArgumentParser(add_help=False)
    add_plugin_arguments(pre)
    known, _ = pre.parse_known_args(argv)
    return _split_names(known.disable_plugins)


def configure_plugins(pm: pluggy.PluginManager, args: argparse.Namespace) -> dict[str, bool | None]:
    """Call every ``configure`` hookimpl one by one and return ``{plugin name: its answer}``.

    Called one at a time (in pluggy's call order) rather than through ``pm.hook.configure`` so each answer
    is attributed to its plugin. A ``UsageError`` raised by a plugin propagates unchanged.
    """
    kwargs = {"args": args}
    answers: dict[str, bool | None] = {}
    for impl in reversed(pm.hook.configure.get_hookimpls()):
        if impl.hookwrapper or impl.wrapper:  # wrappers are generators around the others; nothing to ask
            continue
        answers[impl.plugin_name] = impl.function(*(kwargs[a] for a in impl.argnames))
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
    """Describe every registered plugin (blocked names excluded), in registration order."""
    sources = getattr(pm, "sources", {})
    active = active or {}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # a blocked name
            continue
        dist, version = sources.get(name, (None, None))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        infos.append(PluginInfo(name, dist, version, hooks, active.get(name)))
    return infos


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
        except SystemExit:  # required flags without defaults: activity cannot be judged
            return None
    try:
        return configure_plugins(pm, args)
    except UsageError as err:
        print(f"warning: cannot tell which plugins are active: {err}", file=sys.stderr)
        return None


def plugins_main(argv: list[str]) -> int:
    """``miles plugins [--json] [--disable-plugins a,b]``: list installed plugins."""
    parser = argparse.ArgumentParser(prog="miles plugins", description="List installed miles plugins.")
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


# -------------------------------------------------------------------------------------------------
# --custom-*-path specs
# -------------------------------------------------------------------------------------------------


def load_function(
    spec: str, default_name: str, group: str | None = None, flag: str | None = None
) -> Callable:
    """Resolve a custom-function spec to a callable.

    Forms: ``path/to/file.py`` (function ``default_name``), ``path/to/file.py:func``, ``pkg.mod:func``,
    ``pkg.mod.func``, and, when ``group`` is given, a plain entry-point name of that group. Relative
    paths resolve against the current directory. Every failure is a ``UsageError`` naming the spec.

    :param flag: the flag the spec came from, named in error messages (e.g. ``--custom-rm-path``).
    """
    what = f"{flag} {spec!r}" if flag else f"custom function {spec!r}"
    file_part, _, func = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if file_part.endswith(".py") or "/" in file_part or os.sep in file_part:
        module = _load_file(Path(file_part), what)
        return _attribute(module, func or default_name, what)
    if ":" in spec:
        return _attribute(_import_module(file_part, what), func, what)
    if "." in spec:
        return _load_dotted(spec, what)
    if group is None:
        raise UsageError(
            f"{what} is not a file.py, a module:function or a module.function; give one of those."
        )
    return _load_entry_point(group, spec, what)


def _load_file(path: Path, what: str) -> Any:
    path = (Path.cwd() / path.expanduser()).resolve()
    if not path.is_file():
        raise UsageError(f"{what}: file {str(path)!r} does not exist; check the path.")
    # A unique, stable module name per file: two custom files both called reward.py must not collide.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_miles_custom_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it executes
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise UsageError(
            f"{what}: importing {str(path)!r} failed ({type(err).__name__}: {err}); fix the file."
        ) from err
    return module


def _import_module(name: str, what: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as err:
        raise UsageError(
            f"{what}: module {name!r} cannot be imported ({type(err).__name__}: {err}); "
            "install it or put its directory on PYTHONPATH."
        ) from err


def _load_dotted(spec: str, what: str) -> Callable:
    """``pkg.mod.func`` (or ``pkg.mod.Class.method``): import the longest prefix that is a module."""
    parts = spec.split(".")
    first_error: Exception | None = None
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as err:
            # Only "this prefix is not a module" means try a shorter one; a missing dependency is an error.
            if err.name and (candidate == err.name or candidate.startswith(err.name + ".")):
                first_error = first_error or err
                continue
            return _import_module(candidate, what)  # re-raises as a UsageError
        except Exception:
            return _import_module(candidate, what)
        return _attribute(module, ".".join(parts[i:]), what)
    raise UsageError(
        f"{what}: module {'.'.join(parts[:-1])!r} cannot be imported ({first_error}); "
        "install it or put its directory on PYTHONPATH."
    )


def _attribute(module: Any, attr: str, what: str) -> Callable:
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            custom_file = module.__name__.startswith("_miles_custom_")
            mod_name = module.__file__ if custom_file else module.__name__
            defined = _defined_callables(module)
            have = f"it defines: {', '.join(defined)}" if defined else "it defines no functions"
            raise UsageError(f"{what}: {mod_name!r} has no function {attr!r}; {have}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(
            f"{what}: {attr!r} is a {type(obj).__name__}, not a function; point it at a function."
        )
    return obj


def _defined_callables(module: Any) -> list[str]:
    """Public functions and classes defined in ``module`` itself (not imported into it)."""
    return sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_")
        and (inspect.isfunction(v) or inspect.isclass(v))
        and v.__module__ == module.__name__
    )


def _load_entry_point(group: str, name: str, what: str) -> Callable:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=group)}
    if name not in eps:
        have = ", ".join(sorted(eps)) or "none"
        raise UsageError(
            f"{what} is not an installed {group} name (installed: {have}); "
            "give one of those, a file.py or a module:function."
        )
    try:
        obj = eps[name].load()
    except Exception as err:
        raise UsageError(
            f"{what}: entry point {eps[name].value!r} failed to import ({type(err).__name__}: {err}); "
            "reinstall the distribution that provides it."
        ) from err
    if not callable(obj):
        raise UsageError(f"{what}: entry point {eps[name].value!r} is not callable; fix its distribution.")
    return obj
