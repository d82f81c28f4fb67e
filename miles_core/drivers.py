"""Named implementations chosen by one flag (``--rm-type math``, ``--rollout-backend sglang``), via stevedore.

Each flag reads one entry-point group; a name that is not installed becomes a ``UsageError`` that says which
distribution provides it and how to install it, or lists the names that are installed.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import stevedore
from stevedore.exception import MultipleMatches, NoMatches

from miles_core.plugins import load_function
from miles_core.types import UsageError

REWARDS = "miles.rewards"
GENERATE = "miles.generate"
ROLLOUT_BACKENDS = "miles.rollout_backends"
TRAIN_BACKENDS = "miles.train_backends"

FLAGS: dict[str, str] = {
    REWARDS: "--rm-type",
    GENERATE: "--custom-generate-function-path",
    ROLLOUT_BACKENDS: "--rollout-backend",
    TRAIN_BACKENDS: "--train-backend",
}

_REWARD_NAMES = ("math", "gsm8k", "dapo", "deepscaler", "f1", "gpqa", "remote_rm", "random", "exact_match")
# Names the project ships outside the core: which requirement provides each, for the install hint.
KNOWN_PROVIDERS: dict[str, dict[str, str]] = {
    REWARDS: dict.fromkeys(_REWARD_NAMES, "miles-rewards"),
    ROLLOUT_BACKENDS: {"sglang": "miles-core[sglang]"},
    TRAIN_BACKENDS: {"megatron": "miles-core[megatron]"},
}


def _entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=group))


def available(group: str) -> list[str]:
    """The installed names of ``group``, sorted."""
    return sorted({ep.name for ep in _entry_points(group)})


def _install_hint(requirement: str) -> str:
    """``pip install ...`` for a requirement, and the same from a checkout of the repo."""
    if "[" in requirement:  # an extra of the core: miles-core[sglang]
        extra = requirement[requirement.index("[") :]
        return f"pip install '{requirement}' (from the repo: pip install -e '.{extra}')"
    folder = requirement.replace("-", "_")
    return f"pip install {requirement} (from the repo: pip install -e plugins/{folder})"


def _what_provides(requirement: str) -> str:
    if "[" in requirement:
        dist, extra = requirement.rstrip("]").split("[")
        return f"{dist}'s {extra} extra"
    return f"the {requirement} plugin"


def load_driver(group: str, name: str) -> Any:
    """Load the object registered as ``name`` in entry-point ``group`` (not invoked).

    :raises UsageError: when ``name`` is not installed (with the install command if the project knows
        which distribution provides it, else the installed names), or when it fails to import.
    """
    flag = FLAGS.get(group, group)
    provider = KNOWN_PROVIDERS.get(group, {}).get(name)
    if name not in available(group):
        if provider:
            raise UsageError(
                f"{flag} {name} needs {_what_provides(provider)}, which is not installed: "
                f"{_install_hint(provider)}."
            )
        raise UsageError(f"unknown {flag} {name!r}; installed: {', '.join(available(group)) or 'none'}.")
    try:
        manager = stevedore.DriverManager(namespace=group, name=name, invoke_on_load=False)
    except NoMatches as err:  # listed by importlib.metadata but not by stevedore's (stale) entry-point cache
        raise UsageError(
            f"{flag} {name}: its entry point is installed but could not be found; reinstall its distribution."
        ) from err
    except MultipleMatches as err:
        raise UsageError(f"{flag} {name}: {err}; uninstall all but one of them.") from err
    except ImportError as err:
        hint = f"{_install_hint(provider)}" if provider else "reinstall the distribution that provides it"
        raise UsageError(f"{flag} {name} failed to import ({type(err).__name__}: {err}); {hint}.") from err
    except Exception as err:  # third-party import-time code: name it instead of a traceback
        raise UsageError(
            f"{flag} {name} failed to import ({type(err).__name__}: {err}); "
            "fix or reinstall the distribution that provides it."
        ) from err
    return manager.driver


def get_reward_fn(name: str) -> Callable:
    """The reward function installed as ``--rm-type NAME`` (a ``protocols.RewardFn``)."""
    return load_driver(REWARDS, name)


def _looks_like_spec(spec: str) -> bool:
    return any(c in spec for c in "/.:") or spec.endswith(".py")


def get_generate_fn(spec: str) -> Callable:
    """The generate function for ``--custom-generate-function-path``: a path / dotted spec, or a name."""
    if _looks_like_spec(spec):
        return load_function(spec, "generate", flag=FLAGS[GENERATE])
    return load_driver(GENERATE, spec)


def get_rollout_backend(name: str) -> Any:
    """The rollout engine class (or factory) installed as ``--rollout-backend NAME``."""
    return load_driver(ROLLOUT_BACKENDS, name)


def get_train_backend(name: str) -> Any:
    """The train backend class (or factory) installed as ``--train-backend NAME``."""
    return load_driver(TRAIN_BACKENDS, name)
