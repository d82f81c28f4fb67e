"""Tests of the math grader: each equivalence class, the sympy time limit and the ``math`` reward."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from miles_rewards import math_grader
from miles_rewards.math_grader import grade_response, is_equiv
from miles_rewards.normalize import normalize_answer, parse_number
from miles_rewards.symbolic import symbolic_equal, to_sympy_source
from rewards_helpers import score

EQUAL = [
    ("0.5", r"\frac{1}{2}"),  # decimal vs fraction
    (r"\dfrac{1}{2}", r"\frac12"),  # dfrac and the \frac12 shorthand
    (r"\tfrac{3}{4}", "0.75"),
    ("-0.25", r"-\frac{1}{4}"),
    ("3/4", r"\frac{3}{4}"),
    (r"\text{5 cm}", "5"),  # \text wrapper holding units
    (r"5\text{ cm}", "5"),
    (r"5 \mathrm{~cm}^2", "5"),
    ("18 dollars", "18"),
    (r"\$18.00", "18"),
    (r"\textbf{(113) }", "113"),  # AIME solutions box bold parenthesised answers
    (r"\mathbf{127}", "127"),
    (r"\text{Monday}", "Monday"),
    (r"30^\circ", "30"),  # degrees in every spelling
    (r"30^{\circ}", "30"),
    ("30 degrees", "30"),
    (r"50\%", "50"),  # percent
    ("50%", "50"),
    ("1,000", "1000"),  # thousands commas
    ("1{,}000", "1000"),
    (r"1.2\times10^{3}", "1200"),  # scientific notation
    (r"1.2 \times 10^3", "1.2e3"),
    ("4.5e33", r"4.5\times 10^{33}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    (r"\sqrt[3]{27}", "3"),
    (r"2\pi", r"\pi \cdot 2"),
    (r"2\pi r", r"2 r \pi"),
    (r"\frac{\pi}{2}", "1.5707963"),
    ("2(x+1)", "2x+2"),  # symbolic
    ("x^2+2x+1", "(x+1)^2"),
    ("x(x+1)", "x^2+x"),
    (r"e^{i\pi}", "-1"),
    ("x=5", "5"),  # "x = " prefix
    ("y = 2x+1", "2x+1"),
    ("025", "25"),  # AIME zero padding
    ("104.", "104"),  # trailing period
    (r"\left( 1, 2 \right)", "(1,2)"),  # tuples
    (r"(\frac{1}{2}, 3)", "(0.5,3)"),
    (r"[0, \frac12)", "[0,0.5)"),  # intervals
    (r"(-\infty, 1) \cup (2, \infty)", r"(-\infty,1)\cup(2,\infty)"),
    (r"\{1,2\}", r"\{2,1\}"),  # sets are unordered
    ("1, 2, 3", "3,2,1"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}"),  # matrices
    (r"\begin{pmatrix}\frac12\\ 2\end{pmatrix}", r"\begin{pmatrix}0.5\\2\end{pmatrix}"),
    (r"\left[ 0, 1 \right]", "[0,1]"),
    ("1000000.5", "1000000"),  # numbers within the relative tolerance (1e-6) are equal: 5e-7
    ("1.0000005", "1"),
]

DIFFERENT = [
    ("3", "4"),
    ("-3", "3"),
    ("0.333", r"\frac{1}{3}"),
    ("2.88e-19", "1.325e-27"),  # the tolerance is relative, so tiny values are not all equal
    ("1000002", "1000000"),  # ... and numbers just outside it (1e-6) are not: 2e-6
    ("1.000005", "1"),  # 5e-6
    (r"\frac{1}{10^{9}}", r"2\times10^{-9}"),
    ("(1,2)", "[1,2]"),  # open vs closed interval
    ("(1,2)", "(2,1)"),  # tuples are ordered
    ("[0,1)", "[0,1]"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}"),
    (r"\begin{pmatrix}1&2\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
    ("x^2+2x+1", "(x+1)^3"),
    (r"2\sqrt{2}", r"\sqrt{2}"),
    ("1,2", "1,2,3"),
    ("x=5", "x=6"),
    ("5", ""),
    (r"\text{Monday}", "Tuesday"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equivalent_answers(a: str, b: str) -> None:
    assert is_equiv(a, b), (normalize_answer(a), normalize_answer(b))
    assert is_equiv(b, a)


@pytest.mark.parametrize(("a", "b"), DIFFERENT)
def test_different_answers(a: str, b: str) -> None:
    assert not is_equiv(a, b), (normalize_answer(a), normalize_answer(b))


def test_parse_number() -> None:
    assert parse_number("1.5e3") == 1500.0
    assert parse_number(r"-\frac{3}{4}") == -0.75
    assert parse_number(r"\frac{1}{0}") is None
    assert parse_number("x") is None


def test_sympy_source_rejects_everything_but_arithmetic() -> None:
    assert to_sympy_source(r"\frac{a}{b}+\sqrt{2}") == "((a)/(b))+sqrt(2)"
    for unsafe in ["__import__('os')", "a.b", "lambda: 1", r"\mathcal{Q}", "x[0]", "open;1"]:
        assert to_sympy_source(unsafe) is None, unsafe
    # A name that is a Python builtin is a product of symbols to sympy, never a call of the builtin.
    assert symbolic_equal("open(2)", "2open", 5.0) is True
    assert symbolic_equal("exit(0)", "0", 5.0) is True


def test_pathological_comparison_times_out_and_worker_recovers() -> None:
    assert symbolic_equal("q+w", "w+q", 30.0) is True  # make sure a worker is up: time only the comparison
    start = time.monotonic()
    assert symbolic_equal("10000000!", "1", 0.3) is False  # computing 10^7! takes far longer than 0.3 s
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.3 + 1.0, elapsed  # it waited for the limit, then gave up at once
    start = time.monotonic()
    assert symbolic_equal("3(y-1)", "3y-3", 30.0) is True  # a fresh worker answers the next question
    assert time.monotonic() - start < 10.0


def test_grade_response_uses_last_box_and_label_solution() -> None:
    response = r"First \boxed{3}, no wait: $\boxed{\dfrac{1}{2}}$."
    assert grade_response(response, "0.5") == 1.0
    assert grade_response(response, r"... so the answer is $\boxed{\frac12}$.") == 1.0
    assert grade_response(response, "3") == 0.0
    assert grade_response("The answer is 0.5.", "0.5") == 0.0  # no box, no credit
    assert grade_response(response, None) == 0.0
    assert grade_response(response, "") == 0.0


def test_math_reward_is_async_and_reads_the_timeout_flag() -> None:
    args = SimpleNamespace(math_equivalence_timeout=1.0)
    assert score(math_grader.reward, r"so \boxed{2x+2}", "2(x+1)", args) == 1.0
    assert score(math_grader.reward, r"so \boxed{2x+3}", "2(x+1)", args) == 0.0
