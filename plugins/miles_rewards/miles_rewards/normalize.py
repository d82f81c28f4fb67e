"""Canonical form of a LaTeX-ish final answer, so equal answers written differently compare equal.

``normalize_answer`` removes presentation (``$``, ``\\text{}`` wrappers, units, ``\\left``, degrees, ``%``,
spacing) and rewrites shorthands (``\\dfrac``, ``\\frac12``, ``\\sqrt2``, ``1.2\\times10^{3}``);
``parse_number`` reads a plain number or numeric fraction; ``split_top_level`` splits tuples and lists.
"""

from __future__ import annotations

import re

# Wrappers whose content is the answer; when the content is only words after a number they are units.
_WRAPPERS = r"text|textbf|textit|textrm|textsf|mathrm|mathbf|mathit|mathsf|mbox|operatorname|boldsymbol"
_WRAPPER = re.compile(r"\\(?:" + _WRAPPERS + r")\s*\{")
_UNIT_TEXT = re.compile(r"[\s~]*[A-Za-z\\][A-Za-z\s~./\\]*")
_SPACING = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![A-Za-z])|\\displaystyle|\\[Bb]ig(?:g|l|r)?(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\bdegrees?\b")
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
# "18 dollars": the \b stops the regex from trying every split of a long word (exponential backtracking).
_TRAILING_WORDS = re.compile(r"(" + _NUMBER + r")\s*(?:[A-Za-z]{2,}\b\.?\s*)+")
_SCI = re.compile(r"(\d(?:\.\d+)?)(?:\\times|\\cdot|×|\*)10\^\{?([+-]?\d+)\}?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LHS = re.compile(r"^(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)=")


def matching_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (escaped ``\\{`` / ``\\}`` ignored), or None."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{" and (i == open_at or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return i
    return None


def _strip_wrappers(s: str) -> str:
    """Unwrap ``\\text{..}``-like groups; drop them when they are unit words following a value."""
    while (m := _WRAPPER.search(s)) is not None:
        close = matching_brace(s, m.end() - 1)
        if close is None:
            return s[: m.start()] + s[m.end() :]
        content = s[m.end() : close]
        before, after = s[: m.start()], s[close + 1 :]
        if before.strip() and _UNIT_TEXT.fullmatch(content) and re.search(r"[\d}).]\s*$", before):
            content = ""  # "5 \text{ cm}^2": a unit after a value, exponent and all
            after = re.sub(r"^\s*\^\s*(?:\{[^{}]*\}|\S)", "", after)
        s = before + content + after
    return s


def _strip_outer_parens(s: str) -> str:
    """``(113)`` -> ``113``: one parenthesised item is no tuple (AIME solutions box ``\\textbf{(113)}``)."""
    while len(s) > 2 and s[0] == "(" and s[-1] == ")" and len(split_top_level(s[1:-1])) == 1:
        depth = 0
        for i, ch in enumerate(s):  # the first "(" must close at the very end, not in "(a)(b)"
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(s) - 1:
                return s
        s = s[1:-1]
    return s


def _shorthands(s: str) -> str:
    """Rewrite TeX shorthands with implicit braces into their braced forms."""
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\frac\s?([0-9A-Za-z])\s?([0-9A-Za-z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s?([0-9A-Za-z])\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac(\{[^{}]*\})\s?([0-9A-Za-z])", r"\\frac\1{\2}", s)
    return re.sub(r"\\sqrt\s?([0-9A-Za-z])", r"\\sqrt{\1}", s)


def normalize_answer(answer: object) -> str:
    """The canonical string of one final answer (already taken out of its ``\\boxed{}``)."""
    s = str(answer).strip().replace("\n", " ")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])\.?", "", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\text\{\s*(?:and|or)\s*\}", ",", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_wrappers(s)
    s = s.replace("~", " ").replace("{,}", "").strip()
    if (m := _TRAILING_WORDS.fullmatch(s)) is not None:  # "18 dollars", "5 inches."
        s = m.group(1)
    s = re.sub(r"\s+(?:and|or)\s+", ",", s)
    s = _shorthands(s)
    # Spaces carry no meaning except after a command name: keep "\pi r" from becoming "\pir".
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = s.rstrip(".").rstrip("\\")
    if s.count("=") == 1 and _LHS.match(s):
        s = s.split("=", 1)[1]
    s = _SCI.sub(r"\1e\2", s)
    s = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return _strip_outer_parens(s)


def parse_number(s: str) -> float | None:
    """The value of a normalised plain number, ``a/b`` or ``\\frac{a}{b}`` with numeric parts, else None."""
    if re.fullmatch(_NUMBER + r"(?:[eE][+-]?\d+)?", s):
        return float(s)
    m = re.fullmatch(r"([+-]?)\\frac\{(" + _NUMBER + r")\}\{(" + _NUMBER + r")\}", s)
    if m is None:
        m = re.fullmatch(r"()(" + _NUMBER + r")/(" + _NUMBER + r")", s)
    if m is not None and float(m.group(3)) != 0:
        value = float(m.group(2)) / float(m.group(3))
        return -value if m.group(1) == "-" else value
    return None


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split ``s`` at ``sep`` where no bracket or brace is open: ``(1,2),3`` -> ``["(1,2)", "3"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
    parts.append(s[start:])
    return parts
