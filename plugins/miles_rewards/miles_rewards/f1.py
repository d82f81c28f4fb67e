"""The ``f1`` reward: SQuAD token-level F1 between the response and the best of the reference answers.

Both sides are lower-cased, stripped of punctuation and of the articles a/an/the, and split on
whitespace. A list label scores the maximum over its answers. Thinking before ``</think>`` is ignored.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

_PUNCT = str.maketrans("", "", string.punctuation)


def squad_tokens(text: str) -> list[str]:
    """SQuAD answer normalisation, as tokens."""
    text = str(text).lower().translate(_PUNCT)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1_score(prediction: str, reference: str) -> float:
    """Token F1 of one prediction against one reference (1.0 when both normalise to nothing)."""
    pred, ref = squad_tokens(prediction), squad_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def grade_response(response: str, label: object) -> float:
    """Max F1 of the response over the acceptable answers in ``label`` (a string or a list of them)."""
    answer = (response or "").rsplit("</think>", 1)[-1].strip()
    references = [label] if isinstance(label, str) else list(label or [])
    return max((f1_score(answer, str(r)) for r in references), default=0.0)


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type f1``: SQuAD F1 in [0, 1]."""
    return grade_response(sample.response, sample.label)
