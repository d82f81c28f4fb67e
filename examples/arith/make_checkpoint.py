"""Re-create the demo's starting checkpoint: a tiny Qwen3-MoE taught the arithmetic task by a short SFT.

It writes the task data (examples/arith/data), trains a BPE tokenizer with a chat template, builds a
random Qwen3-MoE with miles' own model code, runs a deliberately short supervised run (so the policy
is only partly right and RL has something to fix), and saves an HF checkpoint with miles' `save_model`.

    python examples/arith/make_checkpoint.py            # writes examples/arith/checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from task import CHAT_TEMPLATE, answer_text, generate, sft_answer  # noqa: E402

from miles_core.model import ModelConfig, build_model, save_model  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: list[str], out: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    # Digits stay single tokens so the model does arithmetic digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok


def render(prompt: str, answer: str | None = None) -> str:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else text + answer + "<|im_end|>"


def model_config(vocab_size: int, eos: int, pad: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "intermediate_size": 192,
        "moe_intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "bos_token_id": None,
        "torch_dtype": "float32",
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
    }


def sft(
    model: torch.nn.Module,
    tok: Tokenizer,
    rows: list[dict],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    careless_frac: float,
) -> None:
    rng = random.Random(seed)
    eos = tok.token_to_id("<|im_end|>")
    encoded = []
    for r in rows:
        p = tok.encode(render(r["prompt"])).ids
        a = tok.encode(sft_answer(r, rng, careless_frac)).ids + [eos]
        encoded.append((p, a))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:  # warmup then cosine
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        chosen = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        width = max(len(p) + len(a) for p, a in chosen)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (p, a) in enumerate(chosen):
            seq = p + a
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, len(p) - 1 : len(seq) - 1] = torch.tensor(a)
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"sft step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "checkpoint"))
    ap.add_argument("--data", default=str(HERE / "data"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--careless-frac", type=float, default=0.6, help="Share of SFT answers that skip carries."
    )
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    counts = generate(a.data, seed=a.seed)
    print("data:", counts)
    rows = [json.loads(line) for line in open(Path(a.data) / "sft.jsonl")]
    tok_dir = Path(a.out + ".tok")
    corpus = [render(r["prompt"], answer_text(int(r["label"]))) for r in rows[:5000]] + ["What is", "user"]
    tok = build_tokenizer(corpus, tok_dir)
    cfg = model_config(tok.get_vocab_size(), tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    model = build_model(ModelConfig.from_hf(cfg))
    sft(model, tok, rows, a.steps, a.batch, a.lr, a.seed, a.careless_frac)
    save_model(model, a.out, tokenizer_src=str(tok_dir))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    print("saved", a.out)


if __name__ == "__main__":
    main()
