"""SFT (--loss-type sft_loss): prompt/response rows become samples with the loss on the response only,
and a short run on the demo checkpoint lowers the response NLL of held-out arithmetic rows."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_CKPT, REPO

from miles_core.cli import main
from miles_core.data import PromptDataset, Tokenizer
from miles_core.data.sft import sft_samples
from miles_core.model import load_model
from miles_core.types import UsageError

DATA = REPO / "examples" / "arith" / "data"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(DEMO_CKPT)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_rows(name: str, n: int) -> list[dict]:
    rows = [json.loads(x) for x in (DATA / name).read_text().splitlines()[:n]]
    return [{"prompt": r["prompt"], "response": f"\\boxed{{{r['label']}}}"} for r in rows]


def test_text_rows_are_prompt_then_response_and_eos(tok, tmp_path):
    path = write_rows(tmp_path / "sft.jsonl", [{"prompt": "What is 1+2?", "response": "\\boxed{3}"}])
    ds = PromptDataset(path, tok, input_key="prompt", label_key="response", apply_chat_template=True)
    (s,) = sft_samples(list(ds), tok)
    response = tok.encode("\\boxed{3}") + [tok.eos_token_id]
    assert s.tokens == ds[0].prompt_ids + response
    assert s.response_length == len(response) and s.loss_mask == [1] * len(response)
    assert s.reward == 0.0 and s.rollout_log_probs is None


def test_messages_rows_train_on_the_assistant_turns(tok, tmp_path):
    msgs = [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "\\boxed{3}"}]
    path = write_rows(tmp_path / "msgs.jsonl", [{"messages": msgs}])
    ds = PromptDataset(path, tok, input_key="messages", apply_chat_template=True)
    (s,) = sft_samples(list(ds), tok)
    prompt = tok.encode("<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n")
    response = tok.encode("\\boxed{3}<|im_end|>\n")
    assert (s.tokens, s.response_length) == (prompt + response, len(response))
    # several turns: each assistant message is trained, the user turn between them is not
    turns = [*msgs, {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "\\boxed{4}"}]
    path = write_rows(tmp_path / "turns.jsonl", [{"messages": turns}])
    (s,) = sft_samples(list(PromptDataset(path, tok, input_key="messages", apply_chat_template=True)), tok)
    a1 = tok.encode("\\boxed{3}<|im_end|>\n")
    user = tok.encode("<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n")
    a2 = tok.encode("\\boxed{4}<|im_end|>\n")
    assert s.tokens == prompt + a1 + user + a2 and s.response_length == len(a1 + user + a2)
    assert s.loss_mask == [1] * len(a1) + [0] * len(user) + [1] * len(a2)
    # a row with neither a label nor an assistant message has nothing to learn
    path = write_rows(tmp_path / "bad.jsonl", [{"messages": msgs[:1]}])
    with pytest.raises(UsageError, match="--label-key"):
        sft_samples(list(PromptDataset(path, tok, input_key="messages", apply_chat_template=True)), tok)


def response_nll(ckpt, samples) -> float:
    """Mean over rows of each response's mean token NLL under the checkpoint (plain forward)."""
    model = load_model(ckpt).eval()
    total = 0.0
    with torch.no_grad():
        for s in samples:
            toks, r = torch.tensor(s.tokens), s.response_length
            logp = torch.log_softmax(model(toks[:-1][None]).logits[0, -r:].float(), -1)
            total += float(-logp.gather(-1, toks[-r:, None]).mean())
    return total / len(samples)


@pytest.mark.slow
def test_sft_run_lowers_held_out_response_nll(tok, tmp_path):
    """SFT on correct answers to training problems lowers the NLL of the correct answers to held-out
    problems (the demo checkpoint learnt from demonstrations that often skip carries): measured 0.156 ->
    0.081 nats per token over 128 held-out rows after 8 steps of 64 rows at lr 1e-4."""
    train = write_rows(tmp_path / "train.jsonl", arith_rows("train.jsonl", 512))
    held = write_rows(tmp_path / "held.jsonl", arith_rows("test.jsonl", 128))
    held_samples = sft_samples(
        list(PromptDataset(held, tok, input_key="prompt", label_key="response", apply_chat_template=True)),
        tok,
    )
    run = tmp_path / "run"
    argv = ["train", "--hf-checkpoint", str(DEMO_CKPT), "--prompt-data", str(train), "--input-key", "prompt",
            "--label-key", "response", "--apply-chat-template", "--loss-type", "sft_loss",
            "--rollout-batch-size", "64", "--n-samples-per-prompt", "1", "--num-rollout", "8",
            "--micro-batch-size", "64", "--lr", "1e-4", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    before = response_nll(DEMO_CKPT, held_samples)
    after = response_nll(run / "final_hf", held_samples)
    assert after < before - 0.03, (before, after)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not any("train/pg_loss" in x for x in lines)
