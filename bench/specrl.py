"""Speculative rollout with an MTP draft on the demo task (miles-specrl): acceptance length and decode speed.

``--mode cpu`` (default): add an MTP head to examples/arith/checkpoint, warm it up on the SFT data (MTP loss
only, policy frozen), then run three short GRPO jobs: no speculation, speculation with the warmed-up draft
frozen, and speculation with the draft trained online. ``--mode gpu``: same warm-up, then decode throughput
of the built-in engine (bf16) with and without speculation. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
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

from miles_core.data import Tokenizer  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.model import load_model, save_model  # noqa: E402

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


def warm_up(src: Path, out: Path, steps: int, device: str, seed: int = 0) -> Path:
    """Add one MTP depth to ``src`` and train it (policy frozen) on the SFT demonstrations."""
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
    opt = torch.optim.AdamW(heads.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        batch = [enc[rng.randrange(len(enc))] for _ in range(64)]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, len(p) : len(p) + len(a)] = 1.0
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            hidden = model(ids[:, :-1], return_hidden=True).hidden
        ((ce, correct, n),) = mtp_losses(model, heads, hidden, ids, mask)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        opt.zero_grad()
        (ce / n).backward()
        opt.step()
    print(f"warm-up: {steps} steps, depth-1 accuracy {float(correct / n):.3f}", file=sys.stderr)
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
        warm = warm_up(CKPT, tmp, args.warmup_steps, "cpu")
        spec = ["--mtp-num-layers", "1", "--sglang-speculative-algorithm", "EAGLE",
                "--sglang-speculative-num-steps", str(args.num_steps)]  # fmt: skip
        res = {name: grpo(warm, tmp / name, args.rollouts, flags) for name, flags in [
            ("nospec", []), ("frozen", spec), ("online", [*spec, "--enable-mtp-training"])]}  # fmt: skip
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


def _decode(model, prompts, params, spec, seed=0) -> tuple[float, int, float]:
    eng = Engine(copy.deepcopy(model), max_batch_size=len(prompts), seed=seed)
    if spec is not None:
        spec.attach(eng)
    eng.generate_batch(prompts[:8], params)  # warm-up: kernels, cache allocation
    _sync()
    t = time.perf_counter()
    outs = eng.generate_batch(prompts, params)
    _sync()
    elapsed = time.perf_counter() - t
    first = Engine(copy.deepcopy(model), max_batch_size=len(prompts), seed=seed)
    first.generate_batch(prompts[:8], dict(params, max_new_tokens=1))
    _sync()
    t = time.perf_counter()
    first.generate_batch(prompts, dict(params, max_new_tokens=1))  # prefill + first token only
    _sync()
    prefill = time.perf_counter() - t
    tokens = sum(len(o.output_ids) for o in outs)
    return tokens / elapsed, tokens, (tokens - len(prompts)) / max(elapsed - prefill, 1e-9)


def gpu(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        warm = warm_up(CKPT, Path(tmp), args.warmup_steps, dev)
        model = load_model(warm, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, device=dev)
        model.requires_grad_(False)
        load_mtp_weights(attach_mtp(model, 1), warm)
    tok = Tokenizer.from_pretrained(CKPT)
    rows = [json.loads(x) for x in (data_dir() / "test.jsonl").read_text().splitlines()]
    prompts = [tok.encode(render(r["prompt"])) for r in rows] * args.samples
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = {"device": name, "sequences": len(prompts), "num_steps": args.num_steps}
    for temp in (0.0, 1.0):
        params = {"temperature": temp, "max_new_tokens": 10}
        base = _decode(model, prompts, params, None)
        spec = Speculator(MTPDrafter(), args.num_steps)
        fast = _decode(model, prompts, params, spec)
        t = spec.totals
        key = "greedy" if temp == 0 else "t1"
        out.update({
            f"{key}_accept_len": round(t.emitted / t.steps, 3),
            f"{key}_tok_s_nospec": round(base[0], 1), f"{key}_tok_s_spec": round(fast[0], 1),
            f"{key}_decode_tok_s_nospec": round(base[2], 1), f"{key}_decode_tok_s_spec": round(fast[2], 1),
            f"{key}_speedup": round(fast[0] / base[0], 3),
            f"{key}_decode_speedup": round(fast[2] / base[2], 3),
        })  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--rollouts", type=int, default=40, help="GRPO rollouts per arm (cpu mode)")
    p.add_argument("--num-steps", type=int, default=3, help="draft tokens per step")
    p.add_argument("--warmup-steps", type=int, default=300, help="MTP-only warm-up steps on the SFT data")
    p.add_argument("--samples", type=int, default=8, help="samples per test prompt (gpu mode)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(json.dumps(cpu(args) if args.mode == "cpu" else gpu(args)))


if __name__ == "__main__":
    main()
