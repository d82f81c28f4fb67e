"""The ``gsm8k`` reward: compare the final number of a response with a GSM8K label numerically.

The final number is the one after the last ``####``, else the one in the last ``\\boxed{}``, else the
last number anywhere; ``$``, thousands commas, units and a trailing period are ignored.
"""

from __future__ import annotations

import math
import re
from typing import Any

from miles_core.api import last_boxed

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _to_float(token: str) -> float | None:
    try:
        return float(token.replace(",", ""))
    except ValueError:
        return None


def _first_number(text: str) -> float | None:
    m = _NUMBER.search(text.replace("$", ""))
    return _to_float(m.group()) if m else None


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a GSM8K-style solution or model response, or None."""
    text = text or ""
    if "####" in text:
        return _first_number(text.rsplit("####", 1)[1])
    boxed = last_boxed(text)
    if boxed is not None:
        # "\$1{,}000" -> 1000; "\frac{1}{2}" is out of GSM8K's scope and reads as its first number.
        return _first_number(re.sub(r"\\[A-Za-z]+", " ", boxed.replace("{,}", ",")))
    numbers = _NUMBER.findall(text.replace("$", ""))
    return _to_float(numbers[-1]) if numbers else None


def label_value(label: object) -> float | None:
    """The number of a GSM8K label: the label itself, or what follows ``####`` in a full answer."""
    text = "" if label is None else str(label)
    return _first_number(text.rsplit("####", 1)[-1])


def grade_response(response: str, label: object) -> float:
    """1.0 when the response's final number equals the label's, else 0.0."""
    pred, gold = extract_final_number(response), label_value(label)
    if pred is None or gold is None:
        return 0.0
    return 1.0 if math.isclose(pred, gold, rel_tol=1e-9) else 0.0


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type gsm8k``: 1.0 if the response's final number equals the label, else 0.0."""
    return grade_response(sample.response, sample.label)
