"""The ``math`` reward: grade the last ``\\boxed{}`` answer of a response against a reference answer.

Equivalence is tried cheapest first: normalised strings, then numbers (relative tolerance 1e-6), then
matrices / interval unions / tuples / sets element by element, and only then sympy (time-limited).
"""

from __future__ import annotations

import asyncio
import math
import re
from functools import lru_cache
from typing import Any

from miles_core.api import last_boxed
from miles_rewards.normalize import normalize_answer, parse_number, split_top_level
from miles_rewards.symbolic import symbolic_equal

DEFAULT_TIMEOUT_S = 2.0
_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}")


def reference_answer(label: object) -> str:
    """The answer in a label: its last ``\\boxed{}`` when it is a worked solution, else the label itself."""
    text = "" if label is None else str(label)
    boxed = last_boxed(text)
    return boxed if boxed is not None else text


def _matrix(s: str) -> list[list[str]] | None:
    m = _MATRIX.fullmatch(s)
    if m is None:
        return None
    body = m.group(2).strip().rstrip("\\")
    return [split_top_level(row, "&") for row in split_top_level(body, "\\\\")]


def _container(s: str) -> tuple[str, list[str]] | None:
    """``(kind, items)`` for tuples/intervals (kind = the two brackets), sets and bare comma lists."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set", split_top_level(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        items = split_top_level(s[1:-1])
        if len(items) > 1 and split_top_level(s) == [s]:  # "(1,2)", not "(1)+(2,3)"-like text
            return s[0] + s[-1], items
    items = split_top_level(s)
    return ("set", items) if len(items) > 1 else None


def _scalar_equal(a: str, b: str, timeout: float) -> bool:
    if a == b:
        return True
    x, y = parse_number(a), parse_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6)  # relative only: 2.9e-19 is not 1.3e-27
    return symbolic_equal(a, b, timeout)


def _unordered_equal(xs: list[str], ys: list[str], timeout: float) -> bool:
    """Multiset equality under ``normalized_equal`` (greedy matching is enough for exact equivalence)."""
    if len(xs) != len(ys):
        return False
    left = list(ys)
    for x in xs:
        hit = next((k for k, y in enumerate(left) if normalized_equal(x, y, timeout)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


@lru_cache(maxsize=65536)
def normalized_equal(a: str, b: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Equivalence of two answers that are already normalised."""
    a, b = normalize_answer(a), normalize_answer(b)  # idempotent; elements of tuples need it too
    if a == b:
        return True
    if not a or not b:
        return False
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        if ma is None or mb is None or [len(r) for r in ma] != [len(r) for r in mb]:
            return False
        return all(normalized_equal(x, y, timeout) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    ua, ub = split_top_level(a, "\\cup"), split_top_level(b, "\\cup")
    if len(ua) > 1 or len(ub) > 1:
        return len(ua) == len(ub) and all(normalized_equal(x, y, timeout) for x, y in zip(ua, ub))
    ca, cb = _container(a), _container(b)
    if ca is not None or cb is not None:
        if ca is None or cb is None or ca[0] != cb[0]:
            return False
        if ca[0] == "set":
            return _unordered_equal(ca[1], cb[1], timeout)
        return len(ca[1]) == len(cb[1]) and all(normalized_equal(x, y, timeout) for x, y in zip(ca[1], cb[1]))
    return _scalar_equal(a, b, timeout)


def is_equiv(pred: object, gold: object, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two final answers (raw strings, outside ``\\boxed{}``) are mathematically the same."""
    if pred is None or gold is None:
        return False
    return normalized_equal(normalize_answer(pred), normalize_answer(gold), timeout)


def grade_response(response: str, label: object, timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the last boxed answer of ``response`` equals the label's answer, else 0.0."""
    pred = last_boxed(response or "")
    gold = reference_answer(label)
    return 1.0 if pred is not None and gold.strip() and is_equiv(pred, gold, timeout) else 0.0


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type math``: 1.0 if the last ``\\boxed{}`` of the response matches ``sample.label``."""
    timeout = float(getattr(args, "math_equivalence_timeout", DEFAULT_TIMEOUT_S) or DEFAULT_TIMEOUT_S)
    # Off the event loop: a symbolic comparison may wait up to `timeout` on the sympy worker.
    return await asyncio.to_thread(grade_response, sample.response, sample.label, timeout)
