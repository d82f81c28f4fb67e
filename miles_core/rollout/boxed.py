"""Find the final ``\\boxed{...}`` answer in a model response.

Used by the core's ``boxed_`` reward prefix and by reward plugins' graders (through ``miles_core.api``).
Braces are matched, so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``; the brace-less
``\\boxed 5`` runs to ``$`` or the line end.
"""

from __future__ import annotations

import re

# `\boxed` or `\fbox`, not followed by more letters (so `\boxedx` is some other macro).
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced(text: str, open_at: int) -> str | None:
    """The content of the group whose ``{`` is at ``open_at``, or None when it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        # An escaped brace (\{ in a set answer) is literal text, not grouping.
        if ch == "{" and (i == open_at or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{..}`` / ``\\fbox{..}`` in ``text``, or None if there is none.

    A box whose braces never close is skipped in favour of an earlier complete one, because a
    truncated response should not be graded on half an answer.
    """
    if not text:
        return None
    for m in reversed(list(_BOX.finditer(text))):
        rest = m.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _braced(text, rest)
            if content is not None:
                return content.strip()
            continue
        if rest > m.end():  # "\boxed 5": the answer runs to the closing $ or the end of the line
            tail = re.split(r"[$\n]", text[rest:], maxsplit=1)[0].strip()
            if tail:
                return tail
    return None
