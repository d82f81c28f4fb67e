"""Tests of the gsm8k, dapo, deepscaler, f1, gpqa, exact_match and random rewards."""

from __future__ import annotations

import random

import pytest
from miles_rewards import dapo, deepscaler, exact_match, f1, gpqa, gsm8k, random_reward
from rewards_helpers import score


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("She pays 5 + 13 = 18 dollars.\n#### 18", "18", 1.0),
        ("#### $1,080.", "1,080", 1.0),  # $, thousands comma, trailing period
        (r"so she earns \boxed{\$1{,}080}", "1080", 1.0),
        ("The total is 18 dollars.", "#### 18", 1.0),  # last number; label given as a full answer
        ("12 apples and then 7 more.", "12", 0.0),  # the last number wins
        ("#### 17\nthough maybe 18", "18", 0.0),  # "####" beats a later number
        ("It drops by -3 degrees.", "-3", 1.0),
        ("Half is 0.5", ".5", 1.0),
        ("no number at all", "5", 0.0),
        ("#### 5", None, 0.0),
    ],
)
def test_gsm8k(response: str, label: str | None, expected: float) -> None:
    assert score(gsm8k.reward, response, label) == expected


def test_dapo_answer_line_scores_plus_minus_one() -> None:
    result = score(dapo.reward, "Long reasoning...\nAnswer: $\\frac{1}{2}$", "\\frac12")
    assert result == {"score": 1.0, "acc": True, "pred": "\\frac{1}{2}"}
    assert score(dapo.reward, "...\nanswer: 12 inches", "12")["score"] == 1.0  # case, units
    assert score(dapo.reward, "...\nAnswer: 100,000", "100000")["acc"] is True
    assert score(dapo.reward, "...\nAnswer: x = 5", "5")["acc"] is True  # right side of "="
    wrong = score(dapo.reward, "...\nAnswer: 7", "8")
    assert wrong == {"score": -1.0, "acc": False, "pred": "7"}
    # Only the last 300 characters are searched.
    assert score(dapo.reward, "Answer: 8\n" + "x" * 400, "8")["score"] == -1.0
    assert score(dapo.reward, "no answer line", "8") == {"score": -1.0, "acc": False, "pred": ""}


def test_deepscaler_requires_the_thinking_marker() -> None:
    assert score(deepscaler.reward, r"<think>maybe \boxed{3}</think> So $\boxed{4}$.", "4") == 1.0
    assert score(deepscaler.reward, r"<think>\boxed{4}</think> no box after", "4") == 0.0
    assert score(deepscaler.reward, r"###Response the answer is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert score(deepscaler.reward, r"no marker \boxed{4}", "4") == 0.0
    assert score(deepscaler.reward, r"</think> \boxed{5}", "4") == 0.0


def test_f1_squad() -> None:
    assert score(f1.reward, "The Eiffel Tower!", "eiffel tower") == 1.0
    assert score(f1.reward, "the tower in Paris", "Eiffel Tower") == pytest.approx(0.4)  # p=1/3, r=1/2
    assert score(f1.reward, "Paris", ["London", "paris, France", "Paris"]) == 1.0
    assert score(f1.reward, "Berlin", ["London", "Paris"]) == 0.0
    assert score(f1.reward, "<think>Berlin? no</think> Paris", "Paris") == 1.0
    assert f1.f1_score("the", "a") == 1.0  # both empty after dropping articles


@pytest.mark.parametrize(
    ("response", "label", "expected"),
    [
        ("The answer is (B).", "B", 1.0),
        ("Answer: C", "C", 1.0),
        ("**Answer:** **D**", "D", 1.0),
        (r"so $\boxed{D}$", "(D)", 1.0),
        (r"$\boxed{\text{(A)}}$", "A", 1.0),
        ("(A) looks right but (C) is correct.", "C", 1.0),  # the last letter counts
        ("Answer: a lot of thought went into this, (B)", "B", 1.0),  # lower-case "a" is no choice
        ("I think B", "B", 0.0),  # a bare letter is too ambiguous to count
        ("Answer: A", "B", 0.0),
    ],
)
def test_gpqa(response: str, label: str, expected: float) -> None:
    assert score(gpqa.reward, response, label) == expected


def test_gpqa_label_as_option_text() -> None:
    choices = ["red", "green", "blue", "black"]
    assert score(gpqa.reward, "Answer: C", "blue", choices=choices) == 1.0
    assert score(gpqa.reward, "Answer: B", "blue", choices=choices) == 0.0
    assert score(gpqa.reward, "Answer: C", "blue") == 0.0  # no choices to look the text up in


def test_exact_match() -> None:
    assert score(exact_match.reward, "  Paris \n", "Paris") == 1.0
    assert score(exact_match.reward, "paris", "Paris") == 0.0
    assert score(exact_match.reward, "", None) == 0.0


def test_random_is_a_fair_coin() -> None:
    random.seed(0)
    draws = [score(random_reward.reward, "x", "y") for _ in range(400)]
    assert set(draws) == {0.0, 1.0}
    assert 150 < sum(draws) < 250
    random.seed(0)
    assert [score(random_reward.reward, "x", "y") for _ in range(400)] == draws  # seeded -> repeatable
