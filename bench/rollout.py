"""Rollout throughput: the built-in engine vs HF transformers `generate` on the same weights.

Both load one random Qwen3-MoE checkpoint written by `miles_core.model.save_model`, decode the same
prompts with the same sampling settings (temperature 1, no top-k/top-p, no EOS so every sequence runs
to the full length) and are timed in this process on this device. `roof_frac` compares the engine with
the bandwidth roof: bytes of the weights a decode step must read at this batch size (every expert that
some row routes to) over the measured device-memory bandwidth. Prints one JSON line.

    python bench/rollout.py --preset cpu-small
    python bench/rollout.py --preset gpu-0.7b --batch 64
    python bench/rollout.py --preset qwen3-30b-a3b --layers 8 --batch 64 [--int4 | --fp8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from miles_core.engine import Engine
from miles_core.engine.cuda_graph import ACTIVE
from miles_core.model import ModelConfig, build_model, fused_moe, save_model, set_fused_moe

BASE = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 4096, "eos_token_id": None, "bos_token_id": None, "pad_token_id": 0,
}  # fmt: skip
PRESETS = {
    # ~0.7B: the config (vocab 32000, hidden 1024, 12 layers, 16/4 heads, 32 experts top-4).
    "gpu-0.7b": dict(
        config=dict(
            vocab_size=32000,
            hidden_size=1024,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=64,
            num_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=512,
            intermediate_size=2816,
        ),
        device="cuda",
        dtype=torch.bfloat16,
        batch=64,
        prompt_len=128,
        new_tokens=256,
    ),  # fmt: skip
    # Qwen3-30B-A3B's layer shape (hidden 2048, 32/4 heads of 128, 128 experts top-8, expert FFN 768,
    # vocab 151936) with 8 of its 48 layers (--layers): ~10 GB of bf16 weights, room on one 80 GB card
    # for a quantized copy beside it (--int4 / --fp8) and the KV cache of batch 256.
    "qwen3-30b-a3b": dict(
        config=dict(
            vocab_size=151936,
            hidden_size=2048,
            num_hidden_layers=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            intermediate_size=6144,
        ),
        device="cuda",
        dtype=torch.bfloat16,
        batch=64,
        prompt_len=128,
        new_tokens=256,
    ),  # fmt: skip
    "cpu-small": dict(
        config=dict(
            vocab_size=2048,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            intermediate_size=256,
        ),
        device="cpu",
        dtype=torch.float32,
        batch=8,
        prompt_len=16,
        new_tokens=32,
    ),  # fmt: skip
}


def make_model(preset: dict, seed: int = 0):
    """A random miles model for the preset, in its device and dtype."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_hf({**BASE, **preset["config"]})
    return build_model(cfg, dtype=preset["dtype"], device=preset["device"]).eval().requires_grad_(False)


def save_checkpoint(model, folder: str) -> str:
    save_model(model, folder)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_miles(
    model, prompts: list[list[int]], new_tokens: int, cuda_graph: bool = True, compile: bool = True
) -> float:
    """The engine's tokens/s, timed on a second pass (the first compiles and captures).

    `cuda_graph` (on CUDA) captures the static decode step; `compile` compiles it with torch.compile
    (`--rollout-compile`; on CPU this is what puts decoding on the static-shape step).
    """
    engine = Engine(model, None, max_batch_size=len(prompts), seed=0)
    engine.compile = compile
    engine.cuda_graph = (cuda_graph and model.lm_head.weight.is_cuda) or compile
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": new_tokens}
    engine.generate_batch(prompts, params)  # warm-up: allocates the cache and captures the graphs
    sync(str(model.lm_head.weight.device))
    t0 = time.perf_counter()
    outs = engine.generate_batch(prompts, params)
    sync(str(model.lm_head.weight.device))
    wall = time.perf_counter() - t0
    time_miles.step_ms = 1e3 * wall / max(1, engine.stats["decode_steps"] // 2)
    time_miles.graph_ms = None
    g = engine._graphs
    if g is not None and g.capture:  # where a step's time goes: the replay alone
        rows, kv_len = g.buckets(len(prompts), len(prompts[0]) + new_tokens)
        run = lambda: g.step(rows, kv_len)  # noqa: E731
        with torch.inference_mode():  # the engine's buffers are inference tensors
            # Rows feed distinct random tokens (so they route to as many experts as a real step) and
            # are then marked idle, so replays do not advance them past the cache.
            gen = torch.Generator().manual_seed(2)
            toks = torch.randint(1, model.config.vocab_size, (rows,), generator=gen).tolist()
            g.load(toks, [0] * rows, [0] * rows, list(range(rows)))
            g.state[ACTIVE].zero_()
            run()
            sync("cuda")
            t1 = time.perf_counter()
            for _ in range(20):
                run()
            sync("cuda")
        time_miles.graph_ms = 1e3 * (time.perf_counter() - t1) / 20
    return sum(len(o.output_ids) for o in outs) / wall


def time_hf(folder: str, prompts: list[list[int]], new_tokens: int, device: str, dtype) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, **kw)
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, **kw)
        sync(device)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0)


def measure_bandwidth(device: str) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * n * 10 / (time.perf_counter() - t0)


def decode_step_bytes(model, batch: int) -> float:
    """Weight bytes one decode step reads: everything but the embedding table, and of the experts only
    those some row routes to (expected count under uniform routing: E * (1 - (1 - k/E)^batch))."""
    cfg = model.config
    total = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        nbytes = p.numel() * p.element_size()
        if ".experts." in name:
            e, k = cfg.num_experts, cfg.num_experts_per_tok
            nbytes *= 1 - (1 - k / e) ** batch
        total += nbytes
    return total


def _shared_preset(name: str) -> str:
    """This bench's preset name in bench/moe_config.py (the quantized benches' presets)."""
    return {"gpu-0.7b": "gpu", "qwen3-30b-a3b": "qwen3-30b-a3b"}.get(name, "cpu-small")


def _size_flags(a: argparse.Namespace) -> list[str]:
    return [f"--batch={a.batch}"] * bool(a.batch) + [f"--layers={a.layers}"] * bool(a.layers)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu-0.7b")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="Decoder layers (default: the preset's).")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="Shorter HF run (tok/s is per token).")
    ap.add_argument("--eager", action="store_true", help="Also time the engine without CUDA graphs.")
    ap.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="Time the engine without torch.compile of the decode step (--rollout-compile off).",
    )  # fmt: skip
    ap.add_argument(
        "--compare-moe", action="store_true",
        help="Also time the engine with the other MoE decode path: grouped GEMMs where the Triton expert "
        "kernels serve by default (--rollout-fused-moe: CUDA with triton, up to ~16 copies an expert), "
        "the kernels elsewhere on CUDA.",
    )  # fmt: skip
    ap.add_argument(
        "--also-uncompiled", action="store_true", help="Also time the engine without torch.compile."
    )
    ap.add_argument(
        "--int4", action="store_true", help="INT4 (miles-int4qat) vs BF16 decode: bench/int4_rollout.py."
    )
    ap.add_argument(
        "--fp8", action="store_true", help="FP8 (miles-fp8) vs BF16 decode: bench/fp8_rollout.py."
    )
    ap.add_argument(
        "--server", action="store_true",
        help="64 concurrent HTTP clients against one `miles serve` vs the in-process engine: "
        "bench/serve_rollout.py.",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.server:  # same 0.7B config, same engine; the served arm lives in its own bench
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import serve_rollout

        extra = [f"--clients={a.batch}"] if a.batch else []
        extra += [f"--new-tokens={a.new_tokens}"] if a.new_tokens else []
        return serve_rollout.main([f"--preset={a.preset}", *extra])
    if a.fp8:  # same engine, same 0.7B config; the FP8 arms live with the plugin's bench
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import fp8_rollout

        extra = [f"--new-tokens={a.new_tokens}"] if a.new_tokens else []
        return fp8_rollout.main([f"--preset={_shared_preset(a.preset)}", *_size_flags(a), *extra])
    if a.int4:  # same engine, same 0.7B config; the INT4 arms live with the plugin's bench
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import int4_rollout

        arms = "--arms=bf16,bf16_eager,int4"
        return int4_rollout.main([f"--preset={_shared_preset(a.preset)}", arms, *_size_flags(a)])
    preset = dict(PRESETS[a.preset])
    if a.layers:
        preset["config"] = {**preset["config"], "num_hidden_layers": a.layers}
    batch = a.batch or preset["batch"]
    new = a.new_tokens or preset["new_tokens"]
    device = preset["device"]
    model = make_model(preset)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, model.config.vocab_size, (batch, preset["prompt_len"]), generator=g).tolist()
    cfg = model.config
    fused_rows = fused_moe.default_max_rows(cfg.num_experts, cfg.num_experts_per_tok, batch)
    # The engine's default, as `miles train` sets it up: the Triton kernels where they run, for decode
    # steps of up to ~16 copies an expert.
    usable = fused_moe.available(model.lm_head.weight)
    default_fused = usable and fused_rows >= batch * cfg.num_experts_per_tok
    set_fused_moe(model, fused_rows if usable else 0)
    miles = time_miles(model, prompts, new, compile=a.compile)
    timing = {"decode_step_ms": round(time_miles.step_ms, 3), "compile": a.compile}
    if time_miles.graph_ms is not None:
        timing["graph_replay_ms"] = round(time_miles.graph_ms, 3)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": a.preset}
    if a.also_uncompiled and a.compile:
        result["miles_uncompiled_tok_s"] = round(time_miles(model, prompts, new, compile=False), 1)
    result["moe_decode"] = "triton" if default_fused else "grouped"
    if a.compare_moe and usable:
        set_fused_moe(model, 0 if default_fused else batch * cfg.num_experts_per_tok)
        other = "grouped" if default_fused else "triton"
        result[f"miles_{other}_moe_tok_s"] = round(time_miles(model, prompts, new, compile=a.compile), 1)
    set_fused_moe(model, fused_rows if usable else 0)
    if a.eager:
        result["miles_eager_tok_s"] = round(time_miles(model, prompts, new, False, compile=False), 1)
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, folder)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        hf = time_hf(folder, prompts, a.hf_new_tokens or new, device, preset["dtype"])
        model = make_model(preset)  # same seed: same weights, for the byte count
    bw = measure_bandwidth(device)
    roof = batch * bw / decode_step_bytes(model, batch)
    result.update(
        miles_tok_s=round(miles, 1), hf_tok_s=round(hf, 1), ratio=round(miles / hf, 2),
        roof_tok_s=round(roof, 1), roof_frac=round(miles / roof, 4), hbm_gb_s=round(bw / 1e9, 1),
        batch=batch, prompt_len=preset["prompt_len"], new_tokens=new, **timing,
    )  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
