"""Entry points, the one way miles finds what is installed: plugins, and named implementations chosen by
one flag (``--rm-type math``, ``--advantage-estimator gspo``, ``--rollout-backend torch``), via stevedore.

Every group is read here and nowhere else. A name that is not installed becomes a ``UsageError`` that
lists the names that are; the core never knows which distribution provides a name.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import stevedore
from stevedore.exception import MultipleMatches, NoMatches

from miles_core.types import UsageError

PLUGINS = "miles.plugins"
REWARDS = "miles.rewards"
GENERATE = "miles.generate"
ADVANTAGES = "miles.advantages"
ROLLOUT_BACKENDS = "miles.rollout_backends"
TRAIN_BACKENDS = "miles.train_backends"
FILTERS = "miles.filters"
TOOLS = "miles.tools"

FLAGS: dict[str, str] = {
    PLUGINS: "plugin",
    REWARDS: "--rm-type",
    GENERATE: "--custom-generate-function-path",
    ADVANTAGES: "--advantage-estimator",
    ROLLOUT_BACKENDS: "--rollout-backend",
    TRAIN_BACKENDS: "--train-backend",
    FILTERS: "--dynamic-sampling-filter-path",
    TOOLS: "--tools",
}


def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    """Every entry point of ``group`` (none loaded), in stevedore's order."""
    return list(stevedore.NamedExtensionManager(group, names=[]).list_entry_points())


def available(group: str) -> list[str]:
    """The installed names of ``group``, sorted."""
    return sorted({ep.name for ep in entry_points(group)})


def distribution(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """(distribution name, version) that declares ``ep``, or ``(None, None)`` if none on the path does."""
    for dist in importlib.metadata.distributions():
        for other in dist.entry_points:
            if (other.group, other.name, other.value) == (ep.group, ep.name, ep.value):
                return dist.metadata["Name"], dist.version
    return None, None


def _failed(what: str, err: BaseException) -> UsageError:
    return UsageError(
        f"{what} failed to import ({type(err).__name__}: {err}); fix or reinstall the distribution "
        "that provides it."
    )


def load_driver(group: str, name: str) -> Any:
    """Load the object registered as ``name`` in entry-point ``group`` (not invoked).

    :raises UsageError: when ``name`` is not installed (listing the installed names), is installed
        twice, or fails to import.
    """
    flag = FLAGS.get(group, group)
    names = available(group)
    if name not in names:
        raise UsageError(f"unknown {flag} {name!r}; installed: {', '.join(names) or 'none'}.")
    try:
        manager = stevedore.DriverManager(namespace=group, name=name, invoke_on_load=False)
    except NoMatches as err:  # listed but not loadable by stevedore's (stale) entry-point cache
        raise UsageError(
            f"{flag} {name}: its entry point is installed but could not be found; reinstall its distribution."
        ) from err
    except MultipleMatches as err:
        raise UsageError(f"{flag} {name}: {err}; uninstall all but one of them.") from err
    except Exception as err:  # third-party import-time code: name it instead of a traceback
        raise _failed(f"{flag} {name}", err) from err
    return manager.driver


def load_plugins(names: list[str]) -> list[tuple[str, Any, importlib.metadata.EntryPoint]]:
    """Load the ``miles.plugins`` entry points ``names``: ``(name, module or object, entry point)``.

    :raises UsageError: a name installed by two distributions, or a plugin that fails to import (with
        the flag that skips it).
    """
    eps = [ep for ep in entry_points(PLUGINS) if ep.name in names]
    seen: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in eps:
        if ep.name in seen:
            raise UsageError(
                f"two installed distributions register a plugin named {ep.name!r} "
                f"({distribution(seen[ep.name])[0]} and {distribution(ep)[0]}); uninstall one of them."
            )
        seen[ep.name] = ep

    def fail(_manager: Any, ep: importlib.metadata.EntryPoint, err: BaseException) -> None:
        dist, version = distribution(ep)
        where = f"plugin {ep.name!r} (from {dist} {version})" if dist else f"plugin {ep.name!r}"
        raise UsageError(
            f"{where} failed to import ({type(err).__name__}: {err}); "
            f"reinstall it or pass --disable-plugins {ep.name}."
        ) from err

    manager = stevedore.NamedExtensionManager(
        PLUGINS, names=list(names), name_order=True, on_load_failure_callback=fail,
        on_missing_entrypoints_callback=lambda missing: None,
    )  # fmt: skip
    return [(ext.name, ext.plugin, seen[ext.name]) for ext in manager.extensions]


def get_reward_fn(name: str) -> Callable:
    """The reward function installed as ``--rm-type NAME`` (a ``protocols.RewardFn``)."""
    return load_driver(REWARDS, name)


def get_tool(name: str) -> Any:
    """The tool installed as ``--tools NAME`` (a ``protocols.Tool``)."""
    return load_driver(TOOLS, name)


def get_estimator(name: str) -> Any:
    """The advantage estimator installed as ``--advantage-estimator NAME`` (``protocols.AdvantageEstimator``),
    instantiated."""
    obj = load_driver(ADVANTAGES, name)
    return obj() if isinstance(obj, type) else obj


def get_rollout_backend(name: str) -> Any:
    """The rollout engine class installed as ``--rollout-backend NAME`` (``protocols.RolloutBackend``)."""
    return load_driver(ROLLOUT_BACKENDS, name)


def get_train_backend(name: str) -> Any:
    """The train backend class installed as ``--train-backend NAME`` (``protocols.TrainBackend``)."""
    return load_driver(TRAIN_BACKENDS, name)
