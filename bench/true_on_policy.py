"""Cost of --true-on-policy-mode on CPU: rollout and train step with and without the mode, in one process.

Each arm builds its own engine and trainer from the demo checkpoint (or ``--hf-checkpoint``); the arms
alternate (normal, mode, normal, ...) over ``--repeats`` rounds of one rollout (``--prompts`` x 8 samples,
up to 10 new tokens, temperature 1), one GRPO step on it (packed micro-batches) and the weight sync.
Times are CPU seconds of this thread (``time.thread_time``), which other jobs on a shared machine do not
inflate, so run it with one torch thread (``OMP_NUM_THREADS=1``; the bench refuses more); wall-clock
medians are reported too.
Also reported: the largest train/rollout log-prob difference of each arm. Prints one JSON line.

    OMP_NUM_THREADS=1 python bench/true_on_policy.py
"""

from __future__ import annotations

import argparse
import json
import statistics
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
SAMPLES_PER_PROMPT = 8


class Arm:
    """One side: an engine and a trainer on their own copies of the checkpoint, mode on or off."""

    def __init__(self, ckpt: str, prompts: int, mode: bool) -> None:
        self.pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
        flags = ["--hf-checkpoint", ckpt, "--prompt-data", "x.jsonl", "--rollout-batch-size", str(prompts),
                 "--n-samples-per-prompt", str(SAMPLES_PER_PROMPT), "--num-rollout", "1", "--rm-type", "math",
                 "--lr", "1e-4", "--use-dynamic-batch-size", "--max-tokens-per-gpu", "2048"]  # fmt: skip
        self.args = parse_args(flags + (["--true-on-policy-mode"] if mode else []), self.pm)
        check_run_args(self.args)
        models = [load_model(ckpt) for _ in range(2)]
        for m, role in zip(models, ("rollout", "train")):
            self.pm.hook.configure_model(args=self.args, model=m, role=role)
        self.tok = Tokenizer.from_pretrained(ckpt)
        self.engine = Engine(models[0].requires_grad_(False), self.tok, max_batch_size=prompts * 8)
        self.trainer = Trainer(self.args, self.pm, models[1])

    def round(self, prompts: list[list[int]]) -> dict[str, float]:
        params = {"temperature": 1.0, "max_new_tokens": 10}
        wall, cpu = time.perf_counter(), time.thread_time()
        outs = self.engine.generate_batch([p for p in prompts for _ in range(SAMPLES_PER_PROMPT)], params)
        r_cpu, r_wall = time.thread_time() - cpu, time.perf_counter() - wall
        samples = [
            Sample(group_index=i // SAMPLES_PER_PROMPT, index=i, tokens=prompts[i // SAMPLES_PER_PROMPT] +
                   o.output_ids, response_length=len(o.output_ids), rollout_log_probs=o.log_probs,
                   loss_mask=[1] * len(o.output_ids), reward=float(len(o.output_ids) % 2),
                   status=Status.COMPLETED, sampling_params=o.sampling_params)
            for i, o in enumerate(outs)
        ]  # fmt: skip
        batch = make_train_batch(samples, self.args)
        wall, cpu = time.perf_counter(), time.thread_time()
        metrics = self.trainer.train(0, batch)[0]
        train_cpu, train_wall = time.thread_time() - cpu, time.perf_counter() - wall
        self.engine.update_weights(self.trainer.named_weights(), self.engine.weight_version + 1)
        tokens = sum(len(o.output_ids) for o in outs)
        return {
            "rollout_tok_per_cpu_s": tokens / r_cpu,
            "rollout_tok_per_s": tokens / r_wall,
            "train_cpu_s": train_cpu,
            "train_s": train_wall,
            "logprob_abs_diff": metrics["train_rollout_logprob_abs_diff"],
        }


def bench() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-checkpoint", default=str(REPO / "examples" / "arith" / "checkpoint"))
    p.add_argument("--prompts", type=int, default=8, help="prompts a rollout (8 samples each)")
    p.add_argument("--repeats", type=int, default=5, help="rounds per arm, alternating; the first is warm-up")
    args = p.parse_args()
    if torch.get_num_threads() != 1:
        raise SystemExit("run with OMP_NUM_THREADS=1: per-thread CPU time misses other threads' work")
    arms = {
        "normal": Arm(args.hf_checkpoint, args.prompts, False),
        "mode": Arm(args.hf_checkpoint, args.prompts, True),
    }
    rows = [json.loads(x) for x in (REPO / "examples" / "arith" / "data" / "train.jsonl").open()]
    tok = arms["normal"].tok
    prompts = [tok.encode(r["prompt"]) for r in rows[: args.prompts * args.repeats]]
    got: dict[str, list[dict]] = {name: [] for name in arms}
    for i in range(args.repeats):
        for name, arm in arms.items():
            got[name].append(arm.round(prompts[i * args.prompts : (i + 1) * args.prompts]))
    out: dict = {"bench": "true_on_policy", "checkpoint": args.hf_checkpoint, "threads": 1}
    for name, rounds in got.items():
        timed = rounds[1:]
        out[name] = {k: statistics.median(r[k] for r in timed) for k in timed[0] if k != "logprob_abs_diff"}
        out[name]["max_logprob_abs_diff"] = max(r["logprob_abs_diff"] for r in rounds)
    n, m = out["normal"], out["mode"]
    out["rollout_slowdown_cpu"] = n["rollout_tok_per_cpu_s"] / m["rollout_tok_per_cpu_s"]
    out["train_slowdown_cpu"] = m["train_cpu_s"] / n["train_cpu_s"]
    return out


if __name__ == "__main__":
    print(json.dumps(bench()))
