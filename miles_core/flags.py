"""The argparse layer of every `miles` command: one-line errors, `--config` YAML read like the command line.

`ArgumentParser` turns argparse's own errors (a bad int, a missing value) into `UsageError`, so the CLI
prints one ``miles: error: ...`` line instead of the full usage. `config_defaults` reads a YAML file of
flags and gives each value the type, choices and boolean spelling the command line would give it.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, NoReturn

import yaml

from miles_core.errors import UsageError

_BOOL_WORDS = {"true": True, "false": False}


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are `UsageError`s (one sentence, exit status 2 from the CLI)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see {self.prog} --help.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each flag's help, unless the help already says what its default is;
    descriptions (the layout pictures) keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def flag_name(action: argparse.Action) -> str:
    """The long option of an action (``--rollout-batch-size``), as a user would type it."""
    longs = [o for o in action.option_strings if o.startswith("--")]
    return longs[0] if longs else "--" + action.dest.replace("_", "-")


def is_boolean(action: argparse.Action) -> bool:
    """True for on/off flags: ``store_true``/``store_false`` and ``BooleanOptionalAction``."""
    return isinstance(action, argparse.BooleanOptionalAction) or (
        action.nargs == 0 and isinstance(action.const, bool)
    )


def _scalar(action: argparse.Action, value: Any, say: str) -> Any:
    kind = action.type or str
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{say}: {e}.") from None
        except (TypeError, ValueError):
            name = getattr(kind, "__name__", "value")
            raise UsageError(f"{say} is {value!r}, which is not a valid {name}.") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UsageError(f"{say} must be an integer, got {value!r}.")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UsageError(f"{say} must be a number, got {value!r}.")
    if kind is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise UsageError(f"{say} must be a string, got {value!r}.")
    return value


def coerce(action: argparse.Action, value: Any, say: str) -> Any:
    """``value`` read from YAML, converted as argparse would convert it from the command line.

    Booleans take YAML booleans or the strings "true"/"false"; an integer flag takes ``8`` or ``8.0``
    (not ``8.5``); a list flag takes a list or one value; choices are checked. Anything else raises
    `UsageError` in one sentence, ``say`` naming the flag.
    """
    if value is None:
        return None
    if is_boolean(action):
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            value = _BOOL_WORDS[value.strip().lower()]
        if not isinstance(value, bool):
            raise UsageError(f"{say} must be true or false, got {value!r}.")
        return value
    if action.nargs == 0:
        raise UsageError(f"{say} cannot be set from a config file.")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        out = [_scalar(action, v, say) for v in items]
    elif isinstance(value, dict) and isinstance(action.default, dict):  # a mapping flag takes a mapping
        out = dict(value)
    elif isinstance(value, (list, dict)):
        raise UsageError(f"{say} takes one value, got {value!r}.")
    else:
        out = _scalar(action, value, say)
    for v in out if isinstance(out, list) else [out]:
        if action.choices is not None and v not in action.choices:
            raise UsageError(f"{say} is {v!r}; choose one of {', '.join(map(str, action.choices))}.")
    return out


def config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The flags of the YAML file ``path`` as ``{dest: value}`` (for ``parser.set_defaults``)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file; pass the path of a YAML file of flags.")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        reason = " ".join(str(e).split())
        raise UsageError(f"--config {path} is not valid YAML ({reason}); fix the file.") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must be a mapping of flag names to values.")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    # A key is a flag's name, which may differ from its dest (``--async`` stores ``async_rollout``).
    named = {flag_name(a)[2:].replace("-", "_"): a for a in actions.values()}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = named.get(dest) or actions.get(dest)
        if action is None or dest in ("help", "config"):
            close = difflib.get_close_matches(dest, sorted(actions), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise UsageError(f"--config {path}: unknown flag '{key}'{hint}; see {parser.prog} --help.")
        if isinstance(action, argparse._AppendAction):
            raise UsageError(
                f"--config {path}: {flag_name(action)} is read before the config file; pass it on the "
                "command line."
            )
        out[action.dest] = coerce(action, value, f"--config {path}: {key}")
    return out
