"""Checks at the boundary to user code: every value a reward or generate function returns is checked here.

A bad value fails its sample (status FAILED, one logged sentence naming the function and what was wrong)
instead of surfacing later as a traceback in the trainer or as ``NaN`` in the metrics. `FailureLog` counts
the failures of a run by kind, so a rollout in which every sample failed can stop the run with one
sentence naming the most common reason and its fix.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from typing import Any

from miles_core.logging import get_logger
from miles_core.types import Sample, Status, UsageError

log = get_logger(__name__)

REWARD_FIX = "make it return a finite number, or a dict whose --reward-key entry is one"
GENERATE_FIX = "make it return the Sample it was given (or a non-empty list of Samples)"
STAGES = {"reward": "reward", "generate": "generate function"}  # how messages name each kind of function
MAX_LOGGED = 5  # failures logged per run beyond the first of each kind


class SampleError(Exception):
    """Why a user function failed a sample.

    ``str(err)`` is the clause that follows the function's name ("returned None, not a Sample"); ``kind``
    is the same clause without the value, so that like failures are counted together; ``fix`` is what to
    change, in the imperative.
    """

    def __init__(self, what: str, kind: str | None = None, fix: str = "") -> None:
        super().__init__(what)
        self.kind = kind or what
        self.fix = fix


def short(value: Any, width: int = 60) -> str:
    """``repr(value)``, cut to ``width`` characters."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_exception(err: BaseException, width: int = 200) -> str:
    """``Type: first line of the message``, cut to ``width`` characters."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def raised(err: BaseException, fix: str) -> SampleError:
    return SampleError(f"raised {describe_exception(err)}", f"raised {type(err).__name__}", fix)


# ---------------------------------------------------------------------------------------------------
# reward values


def _finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a bool or a real number and finite; None otherwise."""
    if isinstance(value, (bool, numbers.Real)):  # numbers.Real covers numpy's scalars too
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def checked_reward(value: Any, key: str | None, source: str) -> float | dict[str, Any]:
    """The reward ``value`` if it is usable: a finite number (returned as a float), or a dict whose ``key``
    entry is one. Raises `SampleError` for a bad value, and `UsageError` for a dict when no ``key`` is
    set (every sample would fail the same way: the flag is missing, not the function wrong)."""
    if isinstance(value, dict):
        if not key:
            raise UsageError(
                f"the reward {source} returned a dict with entries {sorted(map(str, value))}; pass "
                "--reward-key to pick the one that trains the policy (e.g. --reward-key score)."
            )
        if key not in value:
            raise SampleError(
                f"returned a dict without the --reward-key entry {key!r} (its entries: "
                f"{short(sorted(map(str, value)))})",
                f"returned a dict without the --reward-key entry {key!r}",
                "make it return that entry, or pass the --reward-key it does return",
            )
        if _finite_number(value[key]) is None:
            raise SampleError(
                f"returned {key!r}: {short(value[key])}, not a finite number",
                f"returned a non-numeric or non-finite {key!r} entry",
                REWARD_FIX,
            )
        return value
    number = _finite_number(value)
    if number is None:
        kind = short(value) if isinstance(value, float) else f"a {type(value).__name__}"
        raise SampleError(
            f"returned {short(value)} (a {type(value).__name__}), not a finite number or a dict",
            f"returned {kind}",
            REWARD_FIX,
        )
    return number


def checked_group_rewards(value: Any, size: int) -> list[Any]:
    """The list a ``--group-rm`` reward returned, if it holds one reward per sample of the group."""
    if not isinstance(value, (list, tuple)):
        raise SampleError(
            f"returned {short(value)} (a {type(value).__name__}), not a list of one reward per sample",
            f"returned a {type(value).__name__}, not a list",
            "make it return a list with one reward per sample of the group",
        )
    if len(value) != size:
        raise SampleError(
            f"returned {len(value)} rewards for a group of {size}",
            "returned the wrong number of rewards",
            "make it return one reward per sample of the group",
        )
    return list(value)


# ---------------------------------------------------------------------------------------------------
# generate results


def checked_samples(value: Any) -> list[Sample]:
    """The samples a generate function returned: a Sample, or a non-empty list (or tuple) of Samples."""
    if isinstance(value, Sample):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Sample) for v in value):
        return list(value)
    if not isinstance(value, (list, tuple)):
        what, kind = f"{short(value)} (a {type(value).__name__})", f"returned a {type(value).__name__}"
    elif not value:
        what = kind = "an empty list"
    else:
        what, kind = f"a list holding {short(value)}", "a list holding something other than Samples"
    raise SampleError(
        f"returned {what}, not a Sample or a non-empty list of Samples",
        kind if kind.startswith("returned") else f"returned {kind}",
        GENERATE_FIX,
    )


def sample_problem(s: Sample) -> SampleError | None:
    """What is wrong with a generated sample's token fields, or None when the trainer can use it."""
    tokens, n = s.tokens, s.response_length

    def bad(what: str, kind: str, fix: str) -> SampleError:
        return SampleError(f"returned a sample whose {what}", f"returned a sample whose {kind}", fix)

    if not isinstance(tokens, list) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens
    ):
        return bad(
            f"tokens are {short(tokens)}, not a list of ints",
            "tokens are not a list of ints",
            "make sample.tokens the list of token ids, prompt then response",
        )
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n < len(tokens):
        return bad(
            f"response_length {short(n)} does not fit its {len(tokens)} tokens (1 <= response_length < "
            "len(tokens): at least one prompt and one response token)",
            "response_length does not fit its tokens",
            "set response_length to the number of response tokens at the end of sample.tokens",
        )
    for name in ("rollout_log_probs", "loss_mask"):
        values = getattr(s, name)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != n:
            size = f"{len(values)} entries" if isinstance(values, (list, tuple)) else short(values)
            return bad(
                f"{name} has {size} for response_length {n}",
                f"{name} length is not response_length",
                f"give {name} one entry per response token (or None)",
            )
        if name == "rollout_log_probs" and not all(_finite_number(v) is not None for v in values):
            return bad(
                "rollout_log_probs hold a non-finite or non-numeric value",
                "log-probs are not finite",
                "give rollout_log_probs the finite log-probs of the sampled tokens (or None)",
            )
    return None


def blank_response(s: Sample, prompt_tokens: list[int]) -> None:
    """Give a failed sample fields the trainer can batch: its prompt and a one-token filler response
    with loss mask 0 (a micro-batch needs at least one response token, even if nothing trains on it)."""
    s.tokens = [*prompt_tokens, 0]
    s.response, s.response_length = "", 1
    s.rollout_log_probs, s.loss_mask = [0.0], [0]
    s.response_weight_versions = [-1]
    s.rollout_routed_experts = None


# ---------------------------------------------------------------------------------------------------
# counting and logging failures


class FailureLog:
    """The failed samples of a run, counted by stage ("reward", "generate") and kind.

    The first failure of each kind is logged, and any others while fewer than `MAX_LOGGED` were, each
    as one sentence: ``sample 3 FAILED: reward --custom-rm-path r.py returned 'x' (a str), ...``.
    """

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], tuple[str, str]] = {}  # (stage, kind) -> (message, fix)
        self.logged = 0

    def total(self, stage: str) -> int:
        return sum(n for (st, _), n in self.counts.items() if st == stage)

    def record(
        self, samples: list[Sample], stage: str, source: str, err: SampleError, quiet: bool = False
    ) -> None:
        """Mark ``samples`` FAILED because ``stage`` function ``source`` failed with ``err``."""
        message = f"{STAGES[stage]} {source} {err}"
        key = (stage, f"{source} {err.kind}")
        for s in samples:
            s.status = Status.FAILED
            s.reward = 0.0
            s.metadata = s.metadata if isinstance(s.metadata, dict) else {}
            s.metadata[f"{stage}_error"] = message
        new = key not in self.examples
        self.counts[key] += len(samples)
        self.examples.setdefault(key, (message, err.fix))
        if not quiet and (new or self.logged < MAX_LOGGED):
            self.logged += 1
            names = ", ".join(str(s.index) for s in samples[:4]) + (", ..." if len(samples) > 4 else "")
            log.warning("sample%s %s FAILED: %s.", "s" if len(samples) > 1 else "", names, message)

    def check_some_succeeded(self, samples: list[Sample], since: Counter, what: str) -> None:
        """Stop the run (`UsageError`) when every one of ``samples`` failed; ``since`` is a copy of
        `counts` taken before they were made, so the reason is this batch's most common one."""
        if not samples or any(s.status != Status.FAILED for s in samples):
            return
        recent = (self.counts - since).most_common(1)
        if recent:
            key, n = recent[0]
            message, fix = self.examples[key]
            reason = f"most often ({n}) because the {message}; {fix}"
        else:  # failed before this batch was made: not by a function this log watched
            reason = "none of them by a reward or generate function; check the plugins that mark samples"
        raise UsageError(
            f"every sample of {what} failed ({len(samples)} of {len(samples)}), {reason}, then run again."
        )
