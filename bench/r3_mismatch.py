"""Benchmark: how much of the train/rollout mismatch of a bf16 rollout and an fp32 trainer R3 removes.

One random Qwen3-MoE (router logits close together, as in trained MoEs where several experts score
alike) generates one bf16 rollout with route capture on (through the miles-r3 plugin). The fp32 trainer
then computes the "old" log-probs of that same batch with the same weights twice: with its own routing
and with --use-rollout-routing-replay. Only replay differs between the two arms.

    python bench/r3_mismatch.py [--preset cpu-small|gpu] [--device cpu|cuda]

Prints one JSON line: mismatch_no_r3 / mismatch_r3 (fraction of (token, layer, slot) entries whose expert
in the training forward differs from the rollout's), kl_no_r3 / kl_r3 (train_rollout_kl), and the checks
(R3 cuts the KL >= 2x, replayed mismatch exactly 0); the exit status is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "plugins" / "miles_r3"):  # runnable from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import miles_r3.plugin as r3_plugin  # noqa: E402
from miles_r3.routes import MismatchCount, count_mismatch  # noqa: E402
from moe_config import group_args, random_group_samples, random_moe  # noqa: E402

from miles_core import Sample  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.loop import make_train_batch  # noqa: E402
from miles_core.plugins import get_plugin_manager  # noqa: E402
from miles_core.rollout.manager import rollout_options  # noqa: E402
from miles_core.train.losses import mismatch_metrics  # noqa: E402
from miles_core.train.trainer import Trainer  # noqa: E402

PRESETS = {
    # >= 8 experts, >= 4 layers, >= 64 samples; about 10 s on 2 CPU cores.
    "cpu-small": dict(layers=4, experts=16, topk=4, hidden=64, vocab=256, prompts=32, n=2, new_tokens=24),
    # Not yet run on a GPU (sized for one H100; untested).
    "gpu": dict(layers=8, experts=64, topk=8, hidden=512, vocab=4096, prompts=64, n=8, new_tokens=128),
}
GATE_SCALE = 0.1  # shrinks router logits toward each other: bf16 noise then reorders near-tied experts


def build(p: dict, device: torch.device, seed: int):
    model = random_moe({**p, "init": 0.1}, device, seed=seed, max_positions=1024)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(GATE_SCALE)
    return model


def rollout(model, pm, args, p: dict, seed: int) -> list[Sample]:
    """bf16 generation from a copy of the fp32 weights; routes reach the samples through on_route_record."""
    n = p["prompts"] * p["n"]
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), max_batch_size=n, seed=seed)
    engine.set_rollout_options(rollout_options(pm, args, 0, engine))

    def record(s: Sample, out) -> None:
        pm.hook.on_route_record(args=args, sample=s, routed_experts=out.routed_experts)

    return random_group_samples(engine, p, seed, random_rewards=False, each=record)


def old_forward(model, p: dict, samples: list[Sample], *flags: str) -> dict[str, float]:
    """The trainer's "old" log-prob pass, the plugin configured by ``flags``; returns the arm's numbers."""
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[r3_plugin])
    args = group_args(pm, p, *flags)
    batch = make_train_batch(copy.deepcopy(samples), args)
    trainer = Trainer(args, pm, model)
    used = MismatchCount()
    inner = trainer.forward

    def forward(m, mb, record=False, with_entropy=True):  # see the experts this very forward used
        out = inner(m, mb, record=record, with_entropy=with_entropy)
        for j, i in enumerate(mb.index):
            n = len(batch.tokens[i]) - 1
            table = torch.stack([t[j, :n] for t in out[3].used_topk], dim=1)
            nonlocal used
            used = used + count_mismatch(batch.samples[i].rollout_routed_experts, table)
        return out

    trainer.forward = forward
    logp = trainer.compute_log_probs(batch, "old")
    step: dict[str, float] = {}
    pm.hook.post_step(args=args, step=1, model=model, metrics=step)
    idx = range(len(batch))
    kl = mismatch_metrics(
        torch.cat([logp[i] for i in idx]),
        torch.cat([batch.rollout_log_probs[i] for i in idx]),
        torch.cat([batch.loss_masks[i] for i in idx]),
    )
    return {"used_mismatch": used.entry_frac, "router_mismatch": step["routing_mismatch_frac"], **kl}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu-small on CPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (tiny matmuls gain nothing)")
    ns = ap.parse_args(argv)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On a shared CPU, OpenMP spin-waits make small bf16 matmuls ~100x slower with several threads.
    torch.set_num_threads(ns.threads)
    preset = ns.preset or ("gpu" if device.type == "cuda" else "cpu-small")
    p = PRESETS[preset]
    t0 = time.perf_counter()
    model = build(p, device, ns.seed)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[r3_plugin])
    samples = rollout(model, pm, group_args(pm, p, "--record-routing-mismatch"), p, ns.seed)
    t_rollout = time.perf_counter() - t0
    plain = old_forward(model, p, samples, "--record-routing-mismatch")
    r3 = old_forward(model, p, samples, "--use-rollout-routing-replay")
    result = {
        "bench": "r3_mismatch",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": preset,
        **{k: p[k] for k in ("layers", "experts", "topk")},
        "samples": len(samples),
        "tokens": sum(len(s.tokens) - 1 for s in samples),
        "mismatch_no_r3": plain["used_mismatch"],
        "mismatch_r3": r3["used_mismatch"],
        "router_mismatch_r3": r3["router_mismatch"],  # the router's own top-k while replaying (not used)
        "kl_no_r3": plain["train_rollout_kl"],
        "kl_r3": r3["train_rollout_kl"],
        "logprob_abs_diff_no_r3": plain["train_rollout_logprob_abs_diff"],
        "logprob_abs_diff_r3": r3["train_rollout_logprob_abs_diff"],
        "kl_reduction": plain["train_rollout_kl"] / max(r3["train_rollout_kl"], 1e-30),
        "rollout_s": round(t_rollout, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    checks = result["kl_reduction"] >= 2 and result["mismatch_r3"] == 0 and result["mismatch_no_r3"] > 0
    result["ok"] = bool(checks)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
