"""The ``gpqa`` reward: the last multiple-choice letter (A-D) the response commits to, against the label.

Recognised forms: ``\\boxed{D}``, ``Answer: C`` / ``the answer is (C)``, and a bare ``(B)``; whichever
comes last in the response wins. The label is a letter; when it is the text of the correct option,
``sample.metadata["choices"]`` (the options in A-D order) turns it into its letter.
"""

from __future__ import annotations

import re
from typing import Any

_LETTER = re.compile(
    r"\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*\(?([A-D])\)?\s*\}?\s*\}"  # \boxed{D}, \boxed{\text{(D)}}
    r"|(?i:answer)(?:\s+is)?\s*[:：]?[\s*]*\(?([A-D])\b"  # Answer: C, the answer is (C), Answer: **C**
    r"|\(([A-D])\)"  # (B); letters are upper case only, so "answer: a lot" is no choice
)


def extract_choice(response: str) -> str | None:
    """The last choice letter in ``response`` (upper case), or None."""
    hits = [next(g for g in m.groups() if g) for m in _LETTER.finditer(response or "")]
    return hits[-1].upper() if hits else None


def label_letter(label: object, choices: list[str] | None = None) -> str | None:
    """The correct letter: ``"B"`` / ``"(B)"`` as is, or the option text looked up in ``choices``."""
    text = "" if label is None else str(label).strip()
    m = re.fullmatch(r"\(?([A-Da-d])\)?", text)
    if m:
        return m.group(1).upper()
    options = [str(c).strip() for c in (choices or [])][:4]
    return "ABCD"[options.index(text)] if text in options else None


def grade_response(response: str, label: object, choices: list[str] | None = None) -> float:
    """1.0 when the response's last choice letter is the correct one, else 0.0."""
    gold = label_letter(label, choices)
    return 1.0 if gold is not None and extract_choice(response) == gold else 0.0


async def reward(args: Any, sample: Any) -> float:
    """``--rm-type gpqa``: 1.0 for the correct choice letter, else 0.0."""
    return grade_response(sample.response, sample.label, (sample.metadata or {}).get("choices"))
