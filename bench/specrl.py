"""Speculative rollout with an MTP draft on the demo task (miles-specrl): acceptance length and decode speed.

``--mode cpu`` (default): add an MTP head to examples/arith/checkpoint, warm it up on the SFT data (MTP loss
only, policy frozen), then run three short GRPO jobs: no speculation, speculation with the warmed-up draft
frozen, and speculation with the draft trained online. ``--mode gpu``: train a target (the 0.7B MoE of
bench/rollout.py over the demo's byte-level tokenizer) on GSM8K and an MTP depth on its hidden states, then
decode GSM8K test prompts with the built-in engine (bf16, CUDA graphs in both arms) with and without
speculation, greedy and at temperature 1, at each batch size. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "miles_specrl"), str(ROOT / "examples" / "arith")]

from miles_specrl.drafters import MTPDrafter  # noqa: E402
from miles_specrl.mtp import add_mtp_layers, attach_mtp, load_mtp_weights  # noqa: E402
from miles_specrl.speculator import Speculator  # noqa: E402
from miles_specrl.training import mtp_losses  # noqa: E402

from miles_core import RolloutOptions  # noqa: E402
from miles_core.data import Tokenizer  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.model import fused_moe, load_model, save_model, set_fused_moe  # noqa: E402

CKPT = ROOT / "examples" / "arith" / "checkpoint"
DATA = ROOT / "examples" / "arith" / "data"


def render(prompt: str, answer: str | None = None) -> str:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else text + answer + "<|im_end|>"


def data_dir() -> Path:
    if (DATA / "sft.jsonl").is_file():
        return DATA
    import task  # examples/arith/task.py

    task.generate("/tmp/arithdata")
    return Path("/tmp/arithdata")


def warm_up(src: Path, out: Path, steps: int, device: str, chain: int, seed: int = 0) -> Path:
    """Add one MTP depth to ``src`` and train it (policy frozen) on the SFT demonstrations, chained
    ``chain`` times as the drafter uses it (`fit_mtp`)."""
    mtp_ckpt = add_mtp_layers(src, out / "mtp_init", 1, seed=seed)
    model = load_model(mtp_ckpt, device=device).requires_grad_(False)
    heads = attach_mtp(model, 1)
    load_mtp_weights(heads, mtp_ckpt)
    heads.requires_grad_(True)
    tok = Tokenizer.from_pretrained(src)
    eos = tok.token_to_id("<|im_end|>")
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (data_dir() / "sft.jsonl").read_text().splitlines()]
    enc = []
    for r in rows:
        ans = r["label"] if rng.random() < 0.5 else str(r.get("careless", r["label"]))
        p = tok.encode(render(r["prompt"]))
        enc.append((p, tok.encode(f"\\boxed{{{ans}}}") + [eos]))
    seq_len = max(len(p) + len(a) for p, a in enc)
    fit_mtp(model, heads, enc, steps=steps, batch=64, seq_len=seq_len, lr=3e-3, chain=chain, device=device)
    return save_model(model, out / "warm", tokenizer_src=src)


def grpo(ckpt: Path, run_dir: Path, rollouts: int, extra: list[str]) -> dict[str, float]:
    cmd = [
        sys.executable, "-m", "miles_core.cli", "train", "--config", str(ROOT / "examples" / "demo.yaml"),
        "--hf-checkpoint", str(ckpt), "--num-rollout", str(rollouts), "--run-dir", str(run_dir),
        "--eval-interval", "0", "--save-interval", "0", "--prompt-data", str(data_dir() / "train.jsonl"),
        "--eval-prompt-data", "arith", str(data_dir() / "test.jsonl"), *extra,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/tok_per_s" in r]
    tail = rows[-max(1, len(rows) // 5) :]  # "by the end": the last fifth of the run

    def mean(key: str, rs: list[dict]) -> float:
        vals = [r[key] for r in rs if key in r]
        return sum(vals) / len(vals) if vals else 0.0

    return {
        "tok_s": mean("rollout/tok_per_s", rows),
        "accept_len_end": mean("rollout/spec_accept_length", tail),
        "accept_len_start": mean("rollout/spec_accept_length", rows[: len(tail)]),
    }


def cpu(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        warm = warm_up(CKPT, tmp, args.warmup_steps, "cpu", args.num_steps)
        spec = ["--mtp-num-layers", "1", "--sglang-speculative-algorithm", "EAGLE",
                "--sglang-speculative-num-steps", str(args.num_steps)]  # fmt: skip
        online = [*spec, "--enable-mtp-training", "--mtp-train-chain", str(args.num_steps)]
        arms = {"nospec": [], "frozen": spec, "online": online}
        res = {name: grpo(warm, tmp / name, args.rollouts, flags) for name, flags in arms.items()}
    return {
        "accept_len_frozen": round(res["frozen"]["accept_len_end"], 3),
        "accept_len_online": round(res["online"]["accept_len_end"], 3),
        "accept_len_frozen_start": round(res["frozen"]["accept_len_start"], 3),
        "accept_len_online_start": round(res["online"]["accept_len_start"], 3),
        "tok_s_nospec": round(res["nospec"]["tok_s"], 1),
        "tok_s_frozen": round(res["frozen"]["tok_s"], 1),
        "tok_s_online": round(res["online"]["tok_s"], 1),
        "rollouts": args.rollouts, "num_steps": args.num_steps, "device": "cpu",
    }  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# The decode target of --mode gpu: the 0.7B MoE of bench/rollout.py (#3's config) over the demo's
# byte-level tokenizer, trained here on GSM8K; cpu-small is a smoke-test size.
TARGETS = {
    "gpu-0.7b": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                     head_dim=64, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                     intermediate_size=2816),
    "cpu-small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      intermediate_size=128),
}  # fmt: skip


def gsm8k_texts(folder: Path, split: str, tok: Tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + <|im_end|>) of each GSM8K row, in the demo's chat format."""
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no {path}; pass --data with the folder holding GSM8K's {split}.jsonl.")
    eos = tok.token_to_id("<|im_end|>")
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [(tok.encode(render(r["question"])), tok.encode(r["answer"]) + [eos]) for r in rows]


def _batches(data, batch: int, seq_len: int, device: str, rng: random.Random):
    """Endless random batches: ids [B, seq_len] (right-padded) and the loss mask of the answer tokens."""
    while True:
        ids = torch.zeros(batch, seq_len, dtype=torch.long)
        mask = torch.zeros(batch, seq_len)
        for i in range(batch):
            p, a = data[rng.randrange(len(data))]
            row = (p + a)[:seq_len]
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, len(p) : len(row)] = 1.0
        yield ids.to(device), mask.to(device)


def train_target(args: argparse.Namespace, tok: Tokenizer, data, device: str):
    """A fresh model (preset ``args.target``) trained on GSM8K with next-token cross entropy (answers)."""
    from miles_core.model import ModelConfig, build_model

    sys.path.insert(0, str(ROOT / "bench"))
    from rollout import BASE  # noqa: E402

    cfg = {**BASE, **TARGETS[args.target], "vocab_size": tok.vocab_size,
           "eos_token_id": tok.token_to_id("<|im_end|>")}  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf(cfg), dtype=torch.float32, device=device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.target_lr, weight_decay=0.0, betas=(0.9, 0.95))
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    t0, loss = time.perf_counter(), torch.zeros(())
    batches = _batches(data, args.target_batch, args.seq_len, device, random.Random(0))
    for step in range(args.target_steps):
        ids, mask = next(batches)
        for g in opt.param_groups:  # linear warm-up, cosine to 10%
            frac = step / max(1, args.target_steps)
            g["lr"] = args.target_lr * min(1.0, (step + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * frac))
        with amp:
            logits = model(ids[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (nll * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    _sync()
    took = time.perf_counter() - t0
    print(f"target: {args.target_steps} steps in {took:.0f}s, answer loss {float(loss):.3f}", file=sys.stderr)
    return model.requires_grad_(False).eval()


def _engine_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def own_samples(model, prompts: list[list[int]], new_tokens: int, device: str) -> list[tuple[list, list]]:
    """(prompt, response) pairs the target samples itself at temperature 1 (the rollouts an online MTP
    trainer would see)."""
    eng = Engine(copy.deepcopy(model).to(_engine_dtype(device)), max_batch_size=128, seed=1)
    outs = eng.generate_batch(prompts, {"temperature": 1.0, "max_new_tokens": new_tokens})
    return [(p, o.output_ids) for p, o in zip(prompts, outs)]


def fit_mtp(model, heads, data, *, steps: int, batch: int, seq_len: int, lr: float, chain: int, device: str):
    """Train MTP depth 1 (the target frozen; its states detached) on the response tokens of ``data``
    ((prompt, response) id lists), chained ``chain`` times and fed its own output state, the way the
    drafter proposes ``chain`` tokens (`mtp_losses`' ``chain``, online: ``--mtp-train-chain``)."""
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    heads.requires_grad_(True).train()
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    batches = _batches(data, batch, seq_len, device, random.Random(1))
    for step in range(steps):
        ids, mask = next(batches)
        with torch.no_grad(), amp:
            hidden = model(ids[:, :-1], return_hidden=True).hidden.float()
        parts = mtp_losses(model, heads, hidden, ids, mask, chain=[heads.layers[0]] * chain)
        for g in opt.param_groups:  # linear warm-up, cosine to 10%
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        (sum(ce / n for ce, _, n in parts) / len(parts)).backward()
        opt.step()
    acc = ", ".join(f"{float(c / n):.3f}" for _, c, n in parts)
    print(f"mtp: {steps} steps, accuracy of drafts 1..{chain}: {acc}", file=sys.stderr)
    heads.requires_grad_(False).eval()


def _measure(model, prompts, batch: int, spec, compile: bool, temps, new_tokens: int) -> dict[float, tuple]:
    """Per temperature: (tokens/s, mean response length, acceptance length) of one engine with ``batch``
    slots (continuous batching over all ``prompts``). Each measurement is the second of two identical
    generates: the first captures / compiles every step shape the second uses."""
    eng = Engine(copy.deepcopy(model), max_batch_size=batch, seed=0)
    eng.compile = compile
    cfg = model.config
    rows = batch * (spec.k + 1 if spec is not None else 1)  # token rows of a decode / verify step
    usable = fused_moe.available(model.lm_head.weight)
    set_fused_moe(
        eng.model, fused_moe.default_max_rows(cfg.num_experts, cfg.num_experts_per_tok, rows) if usable else 0
    )
    if spec is not None:
        eng.set_rollout_options(RolloutOptions(decode_strategy=spec))
    res = {}
    for temp in temps:
        params = {"temperature": temp, "max_new_tokens": new_tokens}
        for _ in range(2):
            if spec is not None:
                spec.prepare(eng)
            eng.reseed(0)
            _sync()
            t = time.perf_counter()
            outs = eng.generate_batch(prompts, params)
            _sync()
            elapsed = time.perf_counter() - t
        tokens = sum(len(o.output_ids) for o in outs)
        acc = spec.totals.emitted / spec.totals.steps if spec is not None and spec.totals.steps else 1.0
        res[temp] = (tokens / elapsed, tokens / len(outs), acc)
    eng.speculator = None
    del eng
    gc.collect()
    return res


def gpu(args: argparse.Namespace) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.from_pretrained(CKPT)
    train = gsm8k_texts(Path(args.data), "train", tok)
    model = train_target(args, tok, train, dev)
    t0 = time.perf_counter()
    samples = own_samples(model, [p for p, _ in train[: args.mtp_prompts]], args.new_tokens, dev)
    print(f"sampled {len(samples)} responses in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    fit_mtp(model, attach_mtp(model, 1), samples, steps=args.mtp_steps, batch=args.target_batch,
            seq_len=args.seq_len, lr=1e-3, chain=args.num_steps, device=dev)  # fmt: skip
    model = model.to(_engine_dtype(dev))
    if dev == "cuda":
        torch.cuda.empty_cache()
    test = [p for p, _ in gsm8k_texts(Path(args.data), "test", tok)]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": name, "target": args.target, "num_steps": args.num_steps, "new_tokens": args.new_tokens}
    temps = (0.0, 1.0)
    runs = [(b, False) for b in args.batches] + [(b, True) for b in args.compile_batches]
    for batch, compiled in runs:
        prompts = test[: max(8, batch * args.waves)]  # at least 8 responses a measurement
        base = _measure(model, prompts, batch, None, compiled, temps, args.new_tokens)
        spec = Speculator(MTPDrafter(), args.num_steps)
        fast = _measure(model, prompts, batch, spec, compiled, temps, args.new_tokens)
        for temp in temps:
            key = f"b{batch}{'_compiled' if compiled else ''}_{'greedy' if temp == 0 else 't1'}"
            out.update({
                f"{key}_accept_len": round(fast[temp][2], 3), f"{key}_resp_len": round(base[temp][1], 1),
                f"{key}_tok_s_nospec": round(base[temp][0], 1), f"{key}_tok_s_spec": round(fast[temp][0], 1),
                f"{key}_speedup": round(fast[temp][0] / base[temp][0], 3),
            })  # fmt: skip
            print(json.dumps({k: v for k, v in out.items() if k.startswith(key)}), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--rollouts", type=int, default=40, help="GRPO rollouts per arm (cpu mode)")
    p.add_argument("--num-steps", type=int, default=3, help="draft tokens per step")
    p.add_argument("--warmup-steps", type=int, default=300, help="MTP-only warm-up steps on the SFT data")
    g = p.add_argument_group("gpu mode")
    g.add_argument(
        "--target", choices=sorted(TARGETS), default="gpu-0.7b", help="model trained as the target"
    )
    g.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k"), help="GSM8K folder")
    g.add_argument("--target-steps", type=int, default=400)
    g.add_argument("--target-batch", type=int, default=32)
    g.add_argument("--target-lr", type=float, default=1e-3)
    g.add_argument("--seq-len", type=int, default=640, help="training rows (GSM8K Q+A: ~480 tokens)")
    g.add_argument("--mtp-steps", type=int, default=400)
    g.add_argument(
        "--mtp-prompts", type=int, default=1024, help="train prompts the target answers for the MTP"
    )
    g.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    g.add_argument("--waves", type=int, default=2, help="prompts per decode run, in batches")
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument(
        "--compile-batches",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1],
        help="batch sizes measured again with both arms' steps compiled (torch.compile)",
    )
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = cpu(args) if args.mode == "cpu" else gpu(args)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
