"""Training-step throughput and MFU of the built-in trainer (policy loss, backward, AdamW step).

The model is bench/rollout.py's (the ~0.7B Qwen3-MoE on GPU), trained with --bf16 (bf16 weights, fp32
masters in the optimizer) on packed micro-batches (--use-dynamic-batch-size). MFU counts the FLOPs the
step needs: 6 x active (routed) non-embedding parameters per input token, the LM head only at response
positions (the trainer projects nothing else), plus causal attention; the peak is the card's dense bf16
spec (989 TFLOP/s for H100/H200 SXM) and, as `mfu_vs_matmul`, a measured 8192^3 bf16 matmul. Prints one
JSON line; `attention` names the packed-attention kernel (`--packed-attention flash` runs the peer).
`--backend megatron` times --train-backend megatron (megatron-core's GPTModel, local spec, padded
micro-batches of --megatron-micro-batch-size: its attention builds [T, T] scores, so no packed rows)
and, in the same run on the same card, the built-in trainer as its peer (`peer_*` fields).

    python bench/train_step.py --preset cpu-small
    python bench/train_step.py --compile                            # 64 samples, 24.5k tokens a step
    python bench/train_step.py --compile --samples 128 --max-tokens 49152
    python bench/train_step.py --compile --samples 256 --max-tokens 98304   # 98k tokens a step
    python bench/train_step.py --backend megatron                   # needs miles-core[megatron]
    python bench/train_step.py --preset qwen3-30b-a3b --layers 2 --fp8-recipe blockwise --compare-bf16

``--fp8-recipe`` converts the policy as `miles train --fp8-recipe` does (miles-fp8's ``configure_model``,
role ``train``): its linears and experts run the FP8 forward (blockwise: the Triton GEMM and grouped
expert kernels) with the straight-through backward (bf16 GEMMs on the dequantized FP8 operands, the
experts' as grouped GEMMs). ``--compare-bf16`` first times the same step without FP8 in the same process
(a fresh policy of the same seed, freed before the FP8 arm) and adds ``bf16_tok_s`` and ``fp8_speedup``.
The qwen3-30b-a3b preset takes 256 samples of 383 tokens (98,048 tokens a step, 32k-token micro-batches).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rollout import PRESETS, make_model, sync

from miles_core.args import parse_args
from miles_core.model.layers import packed_attention_kernel
from miles_core.plugins import get_plugin_manager
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status, TrainBatch

SHAPES = {  # samples per step, prompt and response lengths, token budget per packed micro-batch
    "gpu-0.7b": dict(samples=64, prompt=128, response=256, max_tokens=24576),  # one micro-batch a step
    "cpu-small": dict(samples=8, prompt=16, response=32, max_tokens=256),
    # 98k tokens a step in 32k-token micro-batches (issue #21 asks >= 64k a step); fp32 masters and AdamW
    # state take ~10 GB per Qwen3-30B-A3B layer and as much for the embeddings + LM head: --layers 2
    "qwen3-30b-a3b": dict(samples=256, prompt=128, response=256, max_tokens=32768),
}
SPEC_PEAK = {"H100": 989e12, "H200": 989e12}


def make_batch(n: int, prompt: int, response: int, vocab: int, device: torch.device) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(1, vocab, (prompt + response,), generator=g) for _ in range(n)]
    samples = [
        Sample(group_index=i // 8, index=i, tokens=t.tolist(), response_length=response,
               status=Status.TRUNCATED, reward=float(i % 2))
        for i, t in enumerate(tokens)
    ]  # fmt: skip
    ones = [torch.ones(response) for _ in range(n)]
    return TrainBatch(
        samples=samples, rewards=torch.zeros(n), tokens=tokens, loss_masks=ones,
        old_log_probs=[torch.full((response,), -10.0) for _ in range(n)],
        advantages=[torch.randn(response, generator=g) for _ in range(n)],
    )  # fmt: skip


def step_flops(model, n: int, prompt: int, response: int) -> float:
    cfg = model.config
    active = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or name.startswith("lm_head"):
            continue
        frac = cfg.num_experts_per_tok / cfg.num_experts if ".experts." in name else 1.0
        active += p.numel() * frac
    seq = prompt + response - 1
    dense = 6 * active * seq * n
    head = 6 * cfg.hidden_size * cfg.vocab_size * response * n
    attn = 6 * seq * seq * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers * n
    return dense + head + attn


def matmul_peak(device: str) -> float:
    if device != "cuda":
        a = torch.randn(1024, 1024)
        reps, size = 5, 1024
    else:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        reps, size = 10, 8192
    a @ a
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0)


def profile_step(trainer: Trainer, batch: TrainBatch, device: str) -> None:
    """One step under torch.profiler: device time per kernel name (top 30) and the step's busy time."""
    import sys
    from collections import defaultdict

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        trainer._step(batch)
        sync(device)
    per_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name[:100]][0] += ev.device_time_total / 1e3
            per_name[ev.name[:100]][1] += 1
    total = sum(v[0] for v in per_name.values())
    print(f"kernel time {total:.1f} ms in {sum(v[1] for v in per_name.values())} kernels", file=sys.stderr)
    for name, (ms, count) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"{ms:9.2f} ms {count:6d}x  {name}", file=sys.stderr)
    # The optimizer on its own (gradient norm, clip, AdamW, masters -> weights), with stand-in gradients.
    opt, params = trainer.optimizer, [p for p in trainer.model.parameters() if p.requires_grad]
    times = []
    for _ in range(4):
        opt.zero_grad()
        for p in params:
            p.grad = torch.zeros_like(p)
        sync(device)
        t0 = time.perf_counter()
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    print(f"optimizer step (norm, clip, AdamW): {min(times[1:]) * 1e3:.2f} ms", file=sys.stderr)


def time_steps(
    trainer, n: int, shape: dict, steps: int, device: str, warmups: int
) -> tuple[float, TrainBatch]:
    """Seconds per optimizer step of ``trainer`` over ``steps`` steps after ``warmups`` untimed ones."""
    batch = make_batch(n, shape["prompt"], shape["response"], trainer.model.config.vocab_size, trainer.device)
    for _ in range(warmups):  # warm-up (and compilation; a second shape may recompile)
        trainer._step(batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer._step(batch)
    sync(device)
    return (time.perf_counter() - t0) / steps, batch


def _fp8_count(model) -> int:
    """How many of the model's modules are miles-fp8's (0 without --fp8-recipe)."""
    return sum(type(m).__name__ in ("Fp8Linear", "Fp8Experts") for m in model.modules())


def _policy(a, preset: dict, shape: dict, fp8_recipe: str | None):
    """The fp32-master policy (seed 0), the trainer's flags (without packing) and the plugin manager;
    with ``fp8_recipe`` the policy converted as `miles train --fp8-recipe` does (miles-fp8's
    ``configure_model``, role ``train``)."""
    model = make_model({**preset, "dtype": torch.float32}).requires_grad_(True)  # fp32 master weights
    n = shape["samples"]
    flags = ["--lr", "1e-6", "--global-batch-size", str(n), "--rollout-batch-size", str(n // 8 or 1),
             "--n-samples-per-prompt", "8", "--num-rollout", "1"]  # fmt: skip
    if preset["device"] == "cuda":
        flags.append("--bf16")
    if a.recompute:
        flags += ["--recompute-granularity", a.recompute]
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    if fp8_recipe:
        from miles_fp8 import plugin as fp8_plugin

        from miles_core.plugins import configure_plugins

        pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[fp8_plugin])
        flags += ["--fp8-recipe", fp8_recipe, "--fp8-stats-interval", "0"]
        fp8_args = parse_args(flags, pm)
        configure_plugins(pm, fp8_args)
        pm.hook.configure_model(args=fp8_args, model=model, role="train")  # as miles train does
    return model, flags, pm


def _time_bf16_peer(a, preset: dict, shape: dict, packing: list[str]) -> tuple[float, float | None]:
    """--compare-bf16: the same step without FP8 on a fresh policy of the same seed, timed first in this
    process and freed before the FP8 arm; returns (seconds per step, peak GB)."""
    import gc

    model, flags, pm = _policy(a, preset, shape, None)
    trainer = Trainer(parse_args(flags + packing, pm), pm, model)
    device = preset["device"]
    dt, _ = time_steps(trainer, shape["samples"], shape, a.steps, device, warmups=2 if a.compile else 1)
    peak = round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None
    del trainer, model
    gc.collect()
    if a.compile:
        torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dt, peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(SHAPES), default="gpu-0.7b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recompute", choices=["full", "selective"], default=None)
    ap.add_argument("--compile", action="store_true", help="--train-compile: compiled decoder layers.")
    ap.add_argument("--profile", action="store_true", help="Also print one step's busiest kernels to stderr.")
    ap.add_argument("--samples", type=int, default=None, help="Samples per step (default: the preset's).")
    ap.add_argument("--max-tokens", type=int, default=None, help="--max-tokens-per-gpu (default: preset's).")
    ap.add_argument("--backend", choices=["torch", "megatron"], default="torch", help="Train backend timed.")
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the preset's).")
    ap.add_argument(
        "--fp8-recipe", choices=["blockwise", "rowwise", "tensorwise"], default=None,
        help="Unified FP8 training forward (miles-fp8, plugins/miles_fp8 on PYTHONPATH); default: none.",
    )  # fmt: skip
    ap.add_argument(
        "--compare-bf16", action="store_true",
        help="With --fp8-recipe: first time the same step without FP8 (fresh policy, same seed) in this "
        "process, then FP8; adds bf16_tok_s and fp8_speedup (bf16 step time / FP8 step time).",
    )  # fmt: skip
    ap.add_argument(
        "--megatron-micro-batch-size", type=int, default=8, help="--micro-batch-size of megatron."
    )
    ap.add_argument(
        "--packed-attention", choices=["auto", "triton", "flash", "sdpa"], default="auto",
        help="The trainer's --packed-attention (flash: torch's flash varlen, the Triton kernels' peer).",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.fp8_recipe and a.backend != "torch":
        raise SystemExit("--fp8-recipe times the built-in trainer only; drop --backend megatron.")
    if a.compare_bf16 and not a.fp8_recipe:
        raise SystemExit("--compare-bf16 times the bf16 peer of an FP8 run; add --fp8-recipe blockwise.")
    preset, shape = dict(PRESETS[a.preset]), dict(SHAPES[a.preset])
    if a.layers:
        preset["config"] = {**preset["config"], "num_hidden_layers": a.layers}
    shape.update({k: v for k, v in (("samples", a.samples), ("max_tokens", a.max_tokens)) if v})
    device = preset["device"]
    n = shape["samples"]
    packing = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(shape["max_tokens"])]
    packing += ["--packed-attention", a.packed_attention] + (["--train-compile"] if a.compile else [])
    bf16_peer = _time_bf16_peer(a, preset, shape, packing) if a.compare_bf16 else None
    model, flags, pm = _policy(a, preset, shape, a.fp8_recipe)
    peer = None
    if a.backend == "megatron":
        from miles_core.megatron.backend import MegatronTrainer

        meg_flags = ["--train-backend", "megatron", "--micro-batch-size", str(a.megatron_micro_batch_size)]
        meg = MegatronTrainer(parse_args(flags + meg_flags, pm), pm, model)
        dt_meg, _ = time_steps(meg, n, shape, a.steps, device, warmups=1)
        del meg
        if device == "cuda":
            torch.cuda.empty_cache()
    trainer = Trainer(parse_args(flags + packing, pm), pm, model)
    dt, batch = time_steps(trainer, n, shape, a.steps, device, warmups=2 if a.compile else 1)
    if a.profile:
        profile_step(trainer, batch, device)
    if a.backend == "megatron":
        peer, dt = dt, dt_meg
    tokens = n * (shape["prompt"] + shape["response"] - 1)
    flops = step_flops(model, n, shape["prompt"], shape["response"])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    measured = matmul_peak(device)
    spec = next((v for k, v in SPEC_PEAK.items() if k in name), None)
    peak = spec or measured
    result = {
        "device": name, "preset": a.preset, "tok_s": round(tokens / dt, 1),
        "mfu": round(flops / dt / peak, 4),
        "mfu_vs_matmul": round(flops / dt / measured, 4), "tflops": round(flops / dt / 1e12, 2),
        "peak_tflops": round(peak / 1e12, 1), "matmul_tflops": round(measured / 1e12, 1),
        "tokens_per_step": tokens, "step_s": round(dt, 4), "recompute": a.recompute, "compile": a.compile,
        "max_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
        "attention": packed_attention_kernel(trainer.device, model.config.head_dim, a.packed_attention)
        or "sdpa",
        "backend": a.backend, "fp8_recipe": a.fp8_recipe, "fp8_modules": _fp8_count(model),
        "layers": model.config.num_hidden_layers,
    }  # fmt: skip
    if bf16_peer is not None:  # the same step without FP8, same seed, batch and card, this process
        result.update(bf16_step_s=round(bf16_peer[0], 4), bf16_tok_s=round(tokens / bf16_peer[0], 1),
                      bf16_max_mem_gb=bf16_peer[1], fp8_speedup=round(bf16_peer[0] / dt, 3))  # fmt: skip
    if peer is not None:  # the built-in trainer, same model, batch and card, packed micro-batches
        result.update(attention="megatron local (unfused)", peer_backend="torch", peer_step_s=round(peer, 4),
                      peer_tok_s=round(tokens / peer, 1), peer_mfu=round(flops / peer / peak, 4))  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
