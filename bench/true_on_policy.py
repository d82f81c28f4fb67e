"""Cost of --true-on-policy-mode: rollout and train step with and without the mode, in one process.

Each arm builds its own engine and trainer (the mode's with the batch-invariant ops, the normal one as
`miles train` runs) and the arms alternate (normal, mode, normal, ...) over ``--repeats`` rounds of one
rollout (``--prompts`` x 8 samples at temperature 1), one GRPO step on it (packed micro-batches) and the
weight sync; the first round is warm-up (compiles, graph captures). Also reported: the largest
train/rollout log-prob difference of each arm (the mode's must be 0.0). Prints one JSON line.

``--preset cpu`` (default): the demo checkpoint (or ``--hf-checkpoint``) in fp32, up to 10 new tokens;
times are CPU seconds of this thread (``time.thread_time``), which other jobs on a shared machine do not
inflate, so run it with one torch thread (``OMP_NUM_THREADS=1``; the bench refuses more).
``--preset gpu``: the ~0.7B random Qwen3-MoE of bench/moe_config.py (bench/rollout.py's ``gpu-0.7b``) in
bf16 on CUDA, ``--new-tokens`` (128) a sample; wall-clock tok/s. The normal arm decodes through CUDA
graphs with the compiled step and the Triton MoE decode kernels and trains with ``--train-compile``; the
mode's arm decodes through CUDA graphs on its Triton kernels, uncompiled on both sides (the mode refuses
compile).

    OMP_NUM_THREADS=1 python bench/true_on_policy.py
    python bench/true_on_policy.py --preset gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from miles_core.args import check_run_args, parse_args
from miles_core.data import Tokenizer
from miles_core.engine import Engine
from miles_core.loop import make_train_batch
from miles_core.model import load_model
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from moe_config import ROLLOUT_PRESETS, random_moe, rollout_engine  # noqa: E402

SAMPLES_PER_PROMPT = 8


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Arm:
    """One side: an engine and a trainer on their own copies of the weights, mode on or off."""

    def __init__(self, a: argparse.Namespace, mode: bool) -> None:
        self.pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
        gpu, ckpt, n = a.preset == "gpu", a.hf_checkpoint, a.prompts * SAMPLES_PER_PROMPT
        flags = ["--hf-checkpoint", ckpt, "--prompt-data", "x.jsonl", "--rollout-batch-size", str(a.prompts),
                 "--n-samples-per-prompt", str(SAMPLES_PER_PROMPT), "--num-rollout", "1", "--rm-type", "math",
                 "--lr", "1e-6" if gpu else "1e-4", "--use-dynamic-batch-size", "--max-tokens-per-gpu",
                 str(a.max_tokens)]  # fmt: skip
        if gpu:
            flags += ["--bf16", "--device", "cuda"] + ([] if mode else ["--train-compile"])
        self.args = parse_args(flags + (["--true-on-policy-mode"] if mode else []), self.pm)
        check_run_args(self.args)
        if gpu:  # the trainer's fp32 masters and the engine's bf16 copy of the same random weights
            p = ROLLOUT_PRESETS["gpu"]
            train = random_moe(p, "cuda", torch.float32, max_positions=1024)
            rollout = random_moe(p, "cuda", torch.float32, max_positions=1024).to(torch.bfloat16)
        else:
            train, rollout = load_model(ckpt), load_model(ckpt)
        for m, role in ((rollout, "rollout"), (train, "train")):
            self.pm.hook.configure_model(args=self.args, model=m, role=role)
        self.tok = None if gpu else Tokenizer.from_pretrained(ckpt)
        rollout.requires_grad_(False)
        if gpu:  # as `miles train` sets it up: graphs on CUDA; the normal arm's step compiled
            self.engine = rollout_engine(rollout, n, compile=not mode)
        else:
            self.engine = Engine(rollout, self.tok, max_batch_size=n)
        self.trainer = Trainer(self.args, self.pm, train)
        self.engine.update_weights(self.trainer.named_weights(), 1)
        self.new_tokens = a.new_tokens if gpu else 10

    def round(self, prompts: list[list[int]]) -> dict[str, float]:
        params = {"temperature": 1.0, "max_new_tokens": self.new_tokens}
        _sync()
        wall, cpu = time.perf_counter(), time.thread_time()
        outs = self.engine.generate_batch([p for p in prompts for _ in range(SAMPLES_PER_PROMPT)], params)
        _sync()
        r_cpu, r_wall = time.thread_time() - cpu, time.perf_counter() - wall
        samples = [
            Sample(group_index=i // SAMPLES_PER_PROMPT, index=i, tokens=prompts[i // SAMPLES_PER_PROMPT] +
                   o.output_ids, response_length=len(o.output_ids), rollout_log_probs=o.log_probs,
                   loss_mask=[1] * len(o.output_ids), reward=float(len(o.output_ids) % 2),
                   status=Status.COMPLETED, sampling_params=o.sampling_params)
            for i, o in enumerate(outs)
        ]  # fmt: skip
        batch = make_train_batch(samples, self.args)
        _sync()
        wall, cpu = time.perf_counter(), time.thread_time()
        metrics = self.trainer.train(0, batch)[0]
        _sync()
        train_cpu, train_wall = time.thread_time() - cpu, time.perf_counter() - wall
        self.engine.update_weights(self.trainer.named_weights(), self.engine.weight_version + 1)
        tokens = sum(len(o.output_ids) for o in outs)
        return {
            "rollout_tok_per_cpu_s": tokens / r_cpu,
            "rollout_tok_per_s": tokens / r_wall,
            "train_cpu_s": train_cpu,
            "train_s": train_wall,
            "train_tok_per_s": sum(len(s.tokens) - 1 for s in samples) / train_wall,
            "logprob_abs_diff": metrics["train_rollout_logprob_abs_diff"],
        }


def bench() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu", help="see the module docstring")
    p.add_argument("--hf-checkpoint", default=str(REPO / "examples" / "arith" / "checkpoint"))
    p.add_argument("--prompts", type=int, default=8, help="prompts a rollout (8 samples each)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens a sample (--preset gpu)")
    p.add_argument("--repeats", type=int, default=None, help="rounds per arm, alternating; the first is "
                   "warm-up (default: 5 on CPU, 3 on GPU)")  # fmt: skip
    p.add_argument("--profile", action="store_true", help="profile each arm's last round (table on stderr)")
    args = p.parse_args()
    gpu = args.preset == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs a CUDA device; use --preset cpu.")
    if not gpu and torch.get_num_threads() != 1:
        raise SystemExit("run with OMP_NUM_THREADS=1: per-thread CPU time misses other threads' work")
    repeats = args.repeats or (3 if gpu else 5)
    args.max_tokens = 24576 if gpu else 2048
    arms = {"normal": Arm(args, False), "mode": Arm(args, True)}
    if gpu:
        g = torch.Generator().manual_seed(1)
        vocab = ROLLOUT_PRESETS["gpu"]["vocab"]
        prompts = torch.randint(1, vocab, (args.prompts * repeats, 128), generator=g).tolist()
    else:
        rows = [json.loads(x) for x in (REPO / "examples" / "arith" / "data" / "train.jsonl").open()]
        tok = arms["normal"].tok
        prompts = [tok.encode(r["prompt"]) for r in rows[: args.prompts * repeats]]
    got: dict[str, list[dict]] = {name: [] for name in arms}
    for i in range(repeats):
        for name, arm in arms.items():
            part = prompts[i * args.prompts : (i + 1) * args.prompts]
            if args.profile and i == repeats - 1:
                with torch.profiler.profile() as prof:
                    got[name].append(arm.round(part))
                key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
                print(f"== {name}\n" + prof.key_averages().table(sort_by=key, row_limit=18), file=sys.stderr)
            else:
                got[name].append(arm.round(part))
    out: dict = {"bench": "true_on_policy", "preset": args.preset}
    if gpu:
        out.update(device=torch.cuda.get_device_name(), dtype="bfloat16", samples=args.prompts * 8,
                   prompt_len=128, new_tokens=args.new_tokens)  # fmt: skip
    else:
        out.update(checkpoint=args.hf_checkpoint, threads=1)
    for name, rounds in got.items():
        timed = rounds[1:]
        out[name] = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k != "logprob_abs_diff"}
        out[name]["max_logprob_abs_diff"] = max(r["logprob_abs_diff"] for r in rounds)
    n, m = out["normal"], out["mode"]
    if gpu:
        out["rollout_slowdown"] = n["rollout_tok_per_s"] / m["rollout_tok_per_s"]
        out["train_slowdown"] = n["train_tok_per_s"] / m["train_tok_per_s"]
    else:
        out["rollout_slowdown_cpu"] = n["rollout_tok_per_cpu_s"] / m["rollout_tok_per_cpu_s"]
        out["train_slowdown_cpu"] = m["train_cpu_s"] / n["train_cpu_s"]
    return out


if __name__ == "__main__":
    print(json.dumps(bench()))
