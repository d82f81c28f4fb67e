"""Where a decode step's GPU time goes: kernels of one static decode step, eager or compiled.

Builds the rollout bench's model (`--preset`), warms the engine's static step up, then runs the step
uncaptured under `torch.profiler` and prints a table of the busiest kernels to stderr and one JSON line:
`{"device", "compile", "kernels_per_step", "kernel_ms_per_step", "top": [[name, ms_per_step], ...]}`.

    python bench/decode_profile.py                 # compiled step (the engine's --rollout-compile)
    python bench/decode_profile.py --no-compile
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from rollout import PRESETS, make_model

from miles_core.engine import Engine
from miles_core.model import fused_moe, set_fused_moe


def profile_generate(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    import time

    params = {"max_new_tokens": new_tokens}
    engine.generate_batch(prompts, params)  # captures (and compiles) every bucket this run needs
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    steps0 = engine.stats["decode_steps"]
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        engine.generate_batch(prompts, params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = defaultdict(float)
    cpu_ops: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name[:90]] += ev.device_time_total / 1e3
        else:
            cpu_ops[ev.name[:90]] += ev.self_cpu_time_total / 1e3
    for title, table in (("kernels (ms)", kernels), ("host ops, self time (ms)", cpu_ops)):
        print(title, file=sys.stderr)
        for name, ms in sorted(table.items(), key=lambda kv: -kv[1])[:15]:
            print(f"{ms:10.2f}  {name}", file=sys.stderr)
    result = {
        "device": torch.cuda.get_device_name(), "compile": engine.compile, "batch": len(prompts),
        "fused_moe": any(m.fused_max_rows for m in engine.model.modules() if hasattr(m, "fused_max_rows")),
        "new_tokens": new_tokens, "wall_ms": round(wall * 1e3, 1),
        "kernel_ms": round(sum(kernels.values()), 1), "host_op_ms": round(sum(cpu_ops.values()), 1),
        "decode_steps": engine.stats["decode_steps"] - steps0,
    }  # fmt: skip
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-0.7b")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument(
        "--grouped-moe", action="store_true",
        help="Grouped-GEMM experts (--no-rollout-fused-moe) where the engine's default uses Triton kernels.",
    )  # fmt: skip
    ap.add_argument(
        "--generate", type=int, default=0, metavar="N",
        help="Instead: profile a whole generate of N new tokens a sequence (prefill, steps, host work) "
        "and report its wall time next to its kernel time.",
    )  # fmt: skip
    a = ap.parse_args(argv)
    preset = PRESETS[a.preset]
    batch = a.batch or preset["batch"]
    model = make_model(preset)
    cfg = model.config
    if fused_moe.available(model.lm_head.weight) and not a.grouped_moe:  # the engine's default
        set_fused_moe(model, fused_moe.default_max_rows(cfg.num_experts, cfg.num_experts_per_tok, batch))
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, model.config.vocab_size, (batch, preset["prompt_len"]), generator=g).tolist()
    engine = Engine(model, None, max_batch_size=batch, seed=0)
    engine.cuda_graph, engine.compile = True, a.compile
    engine.generate_batch(prompts, {"max_new_tokens": 8})
    if a.generate:
        return profile_generate(engine, prompts, a.generate)
    graphs = engine._graphs
    rows, kv_len = graphs.buckets(batch, preset["prompt_len"] + 8)
    step = lambda: graphs._step_fn(rows, kv_len, False, False)  # noqa: E731
    with torch.inference_mode():
        for _ in range(3):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(a.steps):
                step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    per_name: dict[str, float] = defaultdict(float)
    count = 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name[:90]] += ev.device_time_total / 1e3 / a.steps
            count += 1
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:25]
    for name, ms in top:
        print(f"{ms * 1e3:9.1f} us  {name}", file=sys.stderr)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "compile": a.compile, "grouped_moe": a.grouped_moe, "batch": batch,
        "kernels_per_step": round(count / a.steps, 1),
        "kernel_ms_per_step": round(sum(per_name.values()), 3),
        "top": [[n, round(ms, 4)] for n, ms in top[:12]],
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
