"""The graders against real gold solutions (GSM8K, Minerva math, AIME24, AMC23 in ../shared/data).

Every gold solution must score 1 against its own answer, and a GSM8K solution 0 against another row's
answer of a different value: a normaliser that is too loose or too strict shows up here at once.
"""

from __future__ import annotations

import random

import pytest
from miles_rewards import gsm8k, math_grader
from miles_rewards.normalize import normalize_answer, parse_number
from rewards_helpers import load_jsonl

from miles_core.rollout.boxed import last_boxed


def _gsm8k_label(answer: str) -> str:
    return answer.split("####")[-1].strip()


def _as_boxed(solution: str, label: str) -> str:
    """The GSM8K solution with its ``#### N`` line rewritten as a sentence with a boxed answer."""
    return solution.split("####")[0] + f"The answer is \\boxed{{{label}}}."


def _other_labels(labels: list[str]) -> list[str]:
    """For each row, a label from another row whose value differs (fixed-seed shuffle)."""
    shuffled = list(labels)
    random.Random(1234).shuffle(shuffled)
    others = []
    for i, label in enumerate(labels):
        j = i
        while gsm8k.label_value(shuffled[j % len(shuffled)]) == gsm8k.label_value(label):
            j += 1
        others.append(shuffled[j % len(shuffled)])
    return others


@pytest.mark.parametrize("split", ["test", "train"])
def test_gsm8k_gold_solutions(split: str) -> None:
    rows = load_jsonl(f"gsm8k/{split}.jsonl")
    labels = [_gsm8k_label(r["answer"]) for r in rows]
    others = _other_labels(labels)
    failures = []
    for row, label, other in zip(rows, labels, others):
        solution, boxed = row["answer"], _as_boxed(row["answer"], label)
        checks = [
            gsm8k.grade_response(solution, label) == 1.0,
            gsm8k.grade_response(solution, row["answer"]) == 1.0,  # a full answer as the label
            gsm8k.grade_response(solution, other) == 0.0,
            gsm8k.grade_response(boxed, label) == 1.0,  # no ####: the boxed number is the answer
            math_grader.grade_response(boxed, label) == 1.0,
            math_grader.grade_response(boxed, other) == 0.0,
        ]
        if not all(checks):
            failures.append((label, other, checks))
    assert len(rows) > 1000
    assert not failures, failures[:5]


def test_minerva_gold_solutions_match_their_boxed_answer() -> None:
    rows = load_jsonl("math/minerva_math.jsonl")
    answers = [last_boxed(r["solution"]) for r in rows]
    assert len(rows) == 272 and all(a is not None for a in answers)
    for row, answer in zip(rows, answers):
        assert math_grader.grade_response(row["solution"], answer) == 1.0, answer
        assert math_grader.grade_response(row["solution"], row["solution"]) == 1.0, answer
    # Numeric answers of other rows, clearly different in value, must not match.
    values = [parse_number(normalize_answer(a)) for a in answers]
    numeric = [(a, v) for a, v in zip(answers, values) if v is not None]
    assert len(numeric) > 100
    for (a, x), (b, y) in zip(numeric, numeric[1:] + numeric[:1]):
        if abs(x - y) > 1e-3 * max(abs(x), abs(y)):
            assert not math_grader.is_equiv(a, b), (a, b)


def test_aime24_answers_and_solutions() -> None:
    rows = load_jsonl("math/aime24.jsonl")
    graded_solutions = 0
    for row in rows:
        answer = str(row["answer"])
        assert math_grader.grade_response(f"We find ... so it is $\\boxed{{{answer}}}$.", answer) == 1.0
        assert math_grader.grade_response(f"... \\boxed{{{int(answer) + 1}}}", answer) == 0.0
        if last_boxed(row["solution"]) is not None:
            assert math_grader.grade_response(row["solution"], answer) == 1.0, last_boxed(row["solution"])
            graded_solutions += 1
    assert graded_solutions >= 25  # the real AoPS solutions, with \textbf{(113) }, 104., 25 for 025 ...


def test_amc23_answers() -> None:
    rows = load_jsonl("math/amc23.jsonl")
    assert len(rows) == 40
    for row in rows:
        value = float(row["answer"])
        text = str(int(value)) if value.is_integer() else str(value)
        assert math_grader.grade_response(f"Thus $\\boxed{{{text}}}$.", row["answer"]) == 1.0
        assert math_grader.grade_response(f"Thus $\\boxed{{{text}}}$.", str(row["answer"])) == 1.0
        assert math_grader.grade_response(f"Thus $\\boxed{{{value + 2}}}$.", row["answer"]) == 0.0
        assert gsm8k.grade_response(f"So the total is {text}.", row["answer"]) == 1.0
