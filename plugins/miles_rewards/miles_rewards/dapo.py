"""The ``dapo`` reward: DAPO's Minerva-style check of an ``Answer: ...`` line, scored +1 / -1.

Only the last 300 characters of the response are searched (as in DAPO's recipe), both sides go through a
Minerva-style normalisation and must then match exactly. The reward is a dict: train with
``--reward-key score``; ``acc`` and ``pred`` are there for logging.
"""

from __future__ import annotations

import re
from typing import Any

from miles_core.api import last_boxed

_TAIL_CHARS = 300
_ANSWER_LINE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_REPLACE = ((r"\ ", ""), (" ", ""), ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","))
_REPLACE += (("\\$", ""), ("\\text{m}", "\\text{}"))
# Unit words, ordinal suffixes and spacing macros that do not change an answer.
_DROP = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue")
_DROP += ("points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals")
_DROP += ("edges", "students", "childrentickets", "multiples", "ft", "\\text{s}", "\\text{.}")
_DROP += ("\\text{}^2", "\\text{}^3", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!")
_DROP += ("{,}", '"', "\\dots")


def _unwrap(s: str, macro: str) -> str:
    """Replace every ``\\macro{x}`` by ``x`` (innermost group only, as the Minerva recipe does)."""
    return re.sub(r"\\" + macro + r"\{(.*?)\}", r"\1", s)


def normalize_final_answer(answer: str) -> str:
    """Minerva-style canonical form: right side of ``=``, no units or text wrappers, braced shorthands."""
    s = answer.split("=")[-1]
    for old, new in _REPLACE:
        s = s.replace(old, new)
    for junk in _DROP:
        s = s.replace(junk, "")
    inline = re.search(r"\$(.*?)\$", s)  # keep only the first inline-math span, if any
    if inline:
        s = inline.group(1)
    for macro in ("text", "textbf", "overline"):
        s = _unwrap(s, macro)
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"sqrt([^{])", r"sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():  # 100,000 -> 100000
        s = s.replace(",", "")
    return s.strip()


def extract_answer(response: str) -> str | None:
    """The text after the last ``Answer:`` in the response's final 300 characters, or None."""
    found = _ANSWER_LINE.findall((response or "")[-_TAIL_CHARS:])
    return found[-1].strip() if found else None


def grade_response(response: str, label: object) -> dict[str, Any]:
    """``{"score": 1.0 or -1.0, "acc": bool, "pred": str}`` for one response."""
    raw = extract_answer(response)
    pred = normalize_final_answer(raw) if raw is not None else ""
    gold = normalize_final_answer("" if label is None else str(label))
    acc = raw is not None and pred == gold and gold != ""
    return {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


async def reward(args: Any, sample: Any) -> dict[str, Any]:
    """``--rm-type dapo`` (use ``--reward-key score``): +1 / -1 on the ``Answer:`` line."""
    return grade_response(sample.response, sample.label)
