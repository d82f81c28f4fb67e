"""``--custom-*-path`` specs: resolve ``file.py[:func]``, ``pkg.mod:func``, ``pkg.mod.func`` or an
entry-point name to a callable, with every failure a one-sentence ``UsageError`` naming the spec."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from miles_core import drivers
from miles_core.types import UsageError


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
    if name not in drivers.available(group):
        have = ", ".join(drivers.available(group)) or "none"
        raise UsageError(
            f"{what} is not an installed {group} name (installed: {have}); "
            "give one of those, a file.py or a module:function."
        )
    obj = drivers.load_driver(group, name)
    if not callable(obj):
        raise UsageError(f"{what}: entry point {name!r} of {group} is not callable; fix its distribution.")
    return obj


def _looks_like_spec(spec: str) -> bool:
    return any(c in spec for c in "/.:") or spec.endswith(".py")


def get_generate_fn(spec: str) -> Callable:
    """The generate function for ``--custom-generate-function-path``: a path / dotted spec, or a name."""
    if _looks_like_spec(spec):
        return load_function(spec, "generate", flag=drivers.FLAGS[drivers.GENERATE])
    return drivers.load_driver(drivers.GENERATE, spec)
