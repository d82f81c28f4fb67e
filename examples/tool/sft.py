"""Teach the demo's arithmetic checkpoint to call the ``python`` tool half the time: SFT before GRPO.

The demonstrations come from two writers. Half of them (``--tool-frac``) call the tool and copy its
answer; the other half answer directly, skipping carries and borrows as often as the demo's original
teacher did (examples/arith/task.py). The model learns both habits, so it calls the tool on some problems
and guesses on others; the math reward credits only right answers, and GRPO has to learn that the tool pays.

A tool demonstration is exactly what the ``tool_call`` generate function produces at rollout time
(miles_core/rollout/tool_call.py), with the tool's real output, and its tool turn is loss-masked::

    <tool_call>{"name": "python", "arguments": {"code": "print(63+15)"}}</tool_call><|im_end|>
    <|im_start|>user\\n<tool_response>\\n78\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n   (masked)
    \\boxed{78}<|im_end|>

The two copies on this path, the operands into the call (``63+15``) and the tool's output into
``\\boxed{}``, are the only hard tokens (the rest is boilerplate); they are weighed up
(``--call-weight``, ``--copy-weight``), or the tool path would be no more accurate than a guess.

    python examples/tool/sft.py --out /tmp/tool_ckpt
    miles train --config examples/tool/grpo.yaml --hf-checkpoint /tmp/tool_ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent / "arith"))

from task import generate, sft_answer  # noqa: E402

from miles_core.data import Tokenizer  # noqa: E402
from miles_core.model import load_model, save_model  # noqa: E402
from miles_core.rollout.tool_call import tool_turn  # noqa: E402

START = HERE.parent / "arith" / "checkpoint"
QUESTION = re.compile(r"What is (\d+)([+-])(\d+)\?")


def tool_call_text() -> tuple[str, str]:
    """The call that prints an expression, as the text before the expression and the text after it."""
    before, after = json.dumps({"code": "print(EXPR)"}).split("EXPR")
    return f'<tool_call>{{"name": "python", "arguments": {before}', f"{after}}}</tool_call>"


def demonstration(
    row: dict,
    rng: random.Random,
    tool_frac: float,
    careless_frac: float,
    call_weight: float,
    copy_weight: float,
) -> list[tuple[str, float]]:
    """The response of one demonstration as (text, loss weight) pieces."""
    if rng.random() >= tool_frac:
        return [(sft_answer(row, rng, careless_frac) + "<|im_end|>", 1.0)]
    a, op, b = QUESTION.search(row["prompt"]).groups()
    value = int(a) + int(b) if op == "+" else int(a) - int(b)
    before, after = tool_call_text()
    return [
        (before, 1.0),
        (f"{a}{op}{b}", call_weight),  # the operands copied from the question
        (after + "<|im_end|>", 1.0),
        (tool_turn([str(value)], closed=True), 0.0),
        (f"\\boxed{{{value}}}<|im_end|>", copy_weight),  # the tool's output copied into the answer
    ]


def encode(tok: Tokenizer, row: dict, pieces: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
    """Token ids of prompt + response and each token's loss weight (0 on the prompt and the tool turn)."""
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": row["prompt"]}]))
    ids, weights = list(prompt), [0.0] * len(prompt)
    for text, weight in pieces:
        piece = tok.encode(text)
        ids += piece
        weights += [weight] * len(piece)
    return ids, weights


def train(model, batches: list[tuple[list[int], list[float]]], steps: int, batch: int, lr: float, seed: int):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:  # warmup then cosine
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        chosen = [batches[rng.randrange(len(batches))] for _ in range(batch)]
        width = max(len(ids) for ids, _ in chosen)
        x = torch.zeros(batch, width, dtype=torch.long)
        y = torch.zeros(batch, width, dtype=torch.long)
        w = torch.zeros(batch, width)
        for i, (ids, weights) in enumerate(chosen):
            x[i, : len(ids)] = torch.tensor(ids)
            y[i, : len(ids) - 1] = torch.tensor(ids[1:])  # position t predicts token t+1
            w[i, : len(ids) - 1] = torch.tensor(weights[1:])
        logits = model(x).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        loss = (nll * w.flatten()).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"sft step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", default=str(START), help="The checkpoint to teach (the demo's).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tool-frac", type=float, default=0.5, help="Share of demonstrations that call the tool."
    )
    ap.add_argument("--careless-frac", type=float, default=0.9, help="Share of direct answers that slip.")
    ap.add_argument("--call-weight", type=float, default=8.0, help="Loss weight of the operands in a call.")
    ap.add_argument(
        "--copy-weight", type=float, default=16.0, help="Loss weight of the answer after a tool turn."
    )
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as d:  # the demo's SFT split (disjoint from the RL and test prompts)
        generate(d, seed=0)
        rows = [json.loads(line) for line in open(Path(d) / "sft.jsonl")][:4000]
    tok = Tokenizer.from_pretrained(a.start)
    data = [
        encode(tok, r, demonstration(r, rng, a.tool_frac, a.careless_frac, a.call_weight, a.copy_weight))
        for r in rows
    ]
    model = load_model(a.start)
    train(model, data, a.steps, a.batch, a.lr, a.seed)
    save_model(model, a.out, tokenizer_src=a.start)
    print("saved", a.out)


if __name__ == "__main__":
    main()
