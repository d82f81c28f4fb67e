"""The demo's synthetic arithmetic task: "what is a+b?" / "what is a-b?" answered as \\boxed{n}.

Problems are drawn from a seeded generator, so the SFT data, the RL prompts and the held-out test set
are reproducible and disjoint. Every problem lands in one split by a hash of its unordered operand pair,
so a+b, b+a and the subtraction on the same two numbers always share a split: no held-out problem is a
reordering of one the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def needs_carry(a: int, b: int, op: str) -> bool:
    return (a % 10 + b % 10 >= 10) if op == "+" else (a % 10 < b % 10)


def careless(a: int, b: int, op: str) -> int:
    """The classic slip: add digit columns without carrying, or subtract the smaller digit from the
    larger in each column instead of borrowing. Equals the right answer when no carry is needed."""
    if op == "+":
        return int(f"{a // 10 + b // 10}{(a + b) % 10}")
    return (a // 10 - b // 10) * 10 + abs(a % 10 - b % 10)


def make_problem(rng: random.Random, carry_frac: float = 0.75) -> tuple[int, str, int]:
    """Two-digit a+b or a-b (a > b); `carry_frac` of them need a carry or a borrow."""
    want_carry = rng.random() < carry_frac
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = "+" if rng.random() < 0.5 else "-"
        if op == "-":
            a, b = max(a, b), min(a, b)
        if a != b and needs_carry(a, b, op) == want_carry:
            return a, op, b


def pair_key(a: int, b: int) -> tuple[int, int]:
    """The unordered operand pair: the same for a+b, b+a, a-b and b-a."""
    return min(a, b), max(a, b)


def split_of(a: int, b: int) -> str:
    """The split of every problem on operands `a` and `b` (in either order, with either operation)."""
    lo, hi = pair_key(a, b)
    h = int(hashlib.sha256(f"{lo},{hi}".encode()).hexdigest(), 16) % 100
    return "test" if h < 10 else ("sft" if h < 55 else "rl")


QUESTION_RE = re.compile(r"What is (\d+)([+-])(\d+)\?")


def operands(question: str) -> tuple[int, str, int]:
    """(a, op, b) of a question written by `question_text`."""
    m = QUESTION_RE.match(question)
    if m is None:
        raise ValueError(f"not an arithmetic question: {question!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def question_text(expr: str) -> str:
    return f"What is {expr}? Put the answer in \\boxed{{}}."


def answer_text(value: int) -> str:
    return f"\\boxed{{{value}}}"


def sft_answer(row: dict, rng: random.Random, careless_frac: float) -> str:
    """The SFT demonstrations come from two writers: a careful one and a careless one who never carries
    or borrows (`careless_frac` of rows). The policy learns both habits; the reward credits only the
    right answer, so RL has to unlearn the slip the demonstrations taught."""
    return answer_text(row["careless"] if rng.random() < careless_frac else int(row["label"]))


def generate(
    out_dir: str | Path, seed: int = 0, n_sft: int = 20000, n_rl: int = 4000, n_test: int = 256
) -> dict:
    """Write sft.jsonl, train.jsonl (RL prompts) and test.jsonl under ``out_dir``."""
    rng = random.Random(seed)
    want = {"sft": n_sft, "rl": n_rl, "test": n_test}
    rows: dict[str, list[dict]] = {k: [] for k in want}
    seen: set[str] = set()
    while any(len(rows[k]) < want[k] for k in want):
        a, op, b = make_problem(rng)
        value = a + b if op == "+" else a - b
        q = question_text(f"{a}{op}{b}")
        split = split_of(a, b)
        if split == "sft" or q not in seen:
            if len(rows[split]) < want[split]:
                row = {"prompt": q, "label": str(value)}
                if split == "sft":
                    row["careless"] = careless(a, b, op)
                rows[split].append(row)
            seen.add(q)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = {"sft": "sft.jsonl", "rl": "train.jsonl", "test": "test.jsonl"}
    for split, name in names.items():
        with open(out / name, "w") as f:
            for r in rows[split]:
                f.write(json.dumps(r) + "\n")
    return {k: len(v) for k, v in rows.items()}
