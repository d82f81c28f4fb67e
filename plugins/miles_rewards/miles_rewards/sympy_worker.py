"""The child process behind ``symbolic_equal``: reads ``[a, b]`` JSON lines, answers ``1`` or ``0``.

Run as ``python -m miles_rewards.sympy_worker``. Sources come from ``symbolic.to_sympy_source``, whose
whitelist keeps ``parse_expr`` (an ``eval``) away from anything but arithmetic on symbols.
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any

import sympy
from sympy.parsing.sympy_parser import (
    convert_xor,
    implicit_multiplication_application,
    parse_expr,
    standard_transformations,
)

# Everything the parsed expression may name; any other name becomes a Symbol, never a Python builtin.
_NAMES = ("sqrt", "log", "exp", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan")
_NAMES += ("sinh", "cosh", "tanh", "pi", "oo", "factorial", "Symbol", "Function", "Integer", "Float")
_NAMES += ("Rational",)
_MAX_BYTES = 2 << 30
_TRANSFORMS = standard_transformations + (implicit_multiplication_application, convert_xor)


def _parse(src: str) -> Any:
    """The expression of ``src``; an equation ``l = r`` becomes ``l - r``."""
    sides = []
    for part in src.split("="):
        names: dict[str, Any] = {n: getattr(sympy, n) for n in _NAMES}
        names["__builtins__"] = {}
        local = {"e": sympy.E, "i": sympy.I}
        sides.append(parse_expr(part, local_dict=local, global_dict=names, transformations=_TRANSFORMS))
    return sides[0] - sides[1] if len(sides) == 2 else sides[0]


def sympy_equal(a_src: str, b_src: str) -> bool:
    """Whether two sources denote the same value (to a relative 1e-6 when no symbol is left)."""
    if ("=" in a_src) != ("=" in b_src):
        return False
    a, b = sympy.sympify(_parse(a_src)), sympy.sympify(_parse(b_src))
    diff = a - b
    if diff == 0:
        return True
    if not (a.free_symbols or b.free_symbols):
        gap, scale = abs(complex(sympy.N(diff))), max(abs(complex(sympy.N(a))), abs(complex(sympy.N(b))))
        return gap <= 1e-6 * scale  # relative, so tiny physical constants are not all "equal"
    if sympy.simplify(diff) == 0:
        return True
    return "=" in a_src and sympy.simplify(a + b) == 0  # "x - 1 = 0" and "1 - x = 0" are one equation


def _limit_memory() -> None:
    """Cap the address space so a huge power or factorial fails with MemoryError instead of swapping."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (_MAX_BYTES, _MAX_BYTES))
    except (ImportError, ValueError, OSError):  # not on this platform, or a lower hard limit is set
        pass


def main() -> None:
    warnings.simplefilter("ignore")
    _limit_memory()
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            a_src, b_src = json.loads(line)
            result = sympy_equal(a_src, b_src)
        except Exception:  # an unparseable or unsupported answer is simply not equal
            result = False
        out.write("1\n" if result else "0\n")
        out.flush()


if __name__ == "__main__":
    main()
