"""Benchmark: train/rollout mismatch of FP8 rollout with high-precision training vs unified FP8.

One random Qwen3-MoE generates a rollout through the built-in engine with its attention linears and
experts swapped for FP8 modules by the miles-fp8 plugin. The trainer then runs one step on that same batch
with the same master weights twice: with ``--fp8-rollout-only`` (its forward without FP8: the mismatched
baseline) and with ``--fp8-recipe`` (unified: its forward uses the same FP8 quantization). Only the
training forward differs between the two arms.

Three cases, one rollout per engine dtype:

- ``bf16``: a bf16 engine and a ``--bf16`` trainer, as `miles train --bf16` runs on a GPU (the realistic
  case, which decides the exit status);
- ``fp32``: an fp32 engine and an fp32 trainer (the FP8 part of the mismatch alone);
- ``mixed``: the bf16 engine's rollout against an fp32 trainer, where bf16 rounding dominates and
  unified FP8 removes only its FP8 part.

    python bench/fp8_mismatch.py [--preset cpu|gpu] [--device cpu|cuda] [--recipe blockwise]

Prints one JSON line: per case (keys prefixed ``bf16_``, ``fp32_``, ``mixed_``) the means of the core's
``train_rollout_logprob_abs_diff`` and ``tis_clipfrac`` per arm and their ratios (rollout-only /
unified). ``ok`` (the exit status: 1 unless it holds): in the bf16 case rollout-only is non-zero and
unified is at most 1/5 of it in abs diff and below it in clip fraction. ``fp32_ok`` reports, without
deciding, whether unified is <= 1/5 of rollout-only on both metrics in the fp32 case.
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
for path in (ROOT, ROOT / "plugins" / "miles_fp8"):  # runnable from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import miles_fp8.plugin as fp8_plugin  # noqa: E402
from moe_config import group_args, random_group_samples, random_moe  # noqa: E402

from miles_core import Sample  # noqa: E402
from miles_core.engine import Engine  # noqa: E402
from miles_core.loop import make_train_batch  # noqa: E402
from miles_core.plugins import get_plugin_manager  # noqa: E402
from miles_core.train.trainer import Trainer  # noqa: E402

PRESETS = {
    # >= 8 experts, >= 4 layers, >= 64 samples; hidden 192 = one full and one partial 128-block.
    "cpu": dict(
        layers=4, experts=8, topk=2, hidden=192, vocab=512, prompts=32, n=2, new_tokens=32, init=0.05
    ),
    "gpu": dict(
        layers=8, experts=64, topk=8, hidden=1024, vocab=8192, prompts=64, n=8, new_tokens=128, init=0.05
    ),
}
# case -> (engine dtype, trainer flags); cases that share an engine dtype share its rollout
CASES = {"bf16": (torch.bfloat16, ["--bf16"]), "fp32": (torch.float32, []), "mixed": (torch.bfloat16, [])}


def make_args(pm, p: dict, ns: argparse.Namespace, *flags: str) -> argparse.Namespace:
    tis = ["--tis-clip", str(ns.tis_clip), "--tis-clip-low", str(ns.tis_clip_low)]
    return group_args(pm, p, "--lr", "0", *tis, *flags)


def rollout(model, pm, args, p: dict, dtype: torch.dtype, seed: int) -> list[Sample]:
    """Generate from an FP8 engine built from a copy of the master weights (the plugin swaps its layers)."""
    engine_model = copy.deepcopy(model).to(dtype).requires_grad_(False)
    pm.hook.configure_model(args=args, model=engine_model, role="rollout")
    engine = Engine(engine_model, max_batch_size=p["prompts"] * p["n"], seed=seed)
    return random_group_samples(engine, p, seed, random_rewards=True)


def train_arm(model, p: dict, ns, samples: list[Sample], *flags: str) -> dict[str, float]:
    """One trainer step (lr 0) on the rollout; returns the core's logged mismatch metrics of the step."""
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[fp8_plugin])
    args = make_args(pm, p, ns, *flags)
    policy = copy.deepcopy(model)
    pm.hook.configure_model(args=args, model=policy, role="train")
    steps = Trainer(args, pm, policy).train(0, make_train_batch(copy.deepcopy(samples), args))
    return {
        k: sum(s[k] for s in steps) / len(steps) for k in ("train_rollout_logprob_abs_diff", "tis_clipfrac")
    }


def ratio(baseline: float, unified: float) -> float | None:
    """How many times less mismatch unified has (None when unified has none)."""
    return baseline / unified if unified > 0 else None


def arms(model, p: dict, ns, samples: list[Sample], *flags: str) -> dict:
    """Both trainer arms on one rollout; the case's numbers, unprefixed."""
    ro = train_arm(model, p, ns, samples, "--fp8-rollout-only", "--fp8-recipe", ns.recipe, *flags)
    uni = train_arm(model, p, ns, samples, "--fp8-recipe", ns.recipe, *flags)
    absdiff = (ro["train_rollout_logprob_abs_diff"], uni["train_rollout_logprob_abs_diff"])
    clip = (ro["tis_clipfrac"], uni["tis_clipfrac"])
    return {
        "trainer_dtype": "bfloat16" if "--bf16" in flags else "float32",
        "samples": len(samples),
        "response_tokens": sum(s.response_length for s in samples),
        "absdiff_rollout_only": absdiff[0],
        "absdiff_unified": absdiff[1],
        "absdiff_ratio": ratio(*absdiff),
        "tis_clipfrac_rollout_only": clip[0],
        "tis_clipfrac_unified": clip[1],
        "tis_clipfrac_ratio": ratio(*clip),
    }


def measure(model, pm, p: dict, ns) -> dict[str, dict]:
    """Every case of `CASES`: one FP8 rollout per engine dtype, then both trainer arms of each case."""
    rollouts: dict[torch.dtype, tuple[list[Sample], float]] = {}
    cases = {}
    for name, (dtype, flags) in CASES.items():
        t0 = time.perf_counter()
        if dtype not in rollouts:
            args = make_args(pm, p, ns, "--fp8-recipe", ns.recipe)
            rollouts[dtype] = (rollout(model, pm, args, p, dtype, ns.seed), time.perf_counter() - t0)
        samples, t_rollout = rollouts[dtype]
        cases[name] = arms(model, p, ns, samples, *flags)
        cases[name].update(rollout_s=round(t_rollout, 2), wall_s=round(time.perf_counter() - t0, 2))
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu on CPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--recipe", default="blockwise", choices=["blockwise", "rowwise", "tensorwise"])
    ap.add_argument("--tis-clip", type=float, default=1.2, help="ratio above this counts in tis_clipfrac")
    ap.add_argument("--tis-clip-low", type=float, default=0.8, help="ratio below this counts in tis_clipfrac")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args(argv)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(ns.threads)
    preset = ns.preset or ("gpu" if device.type == "cuda" else "cpu")
    p = PRESETS[preset]
    t0 = time.perf_counter()
    model = random_moe(p, device, seed=ns.seed, max_positions=1024)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}, extra=[fp8_plugin])
    cases = measure(model, pm, p, ns)
    result = {
        "bench": "fp8_mismatch",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": preset,
        "recipe": ns.recipe,
        "seed": ns.seed,
        **{k: p[k] for k in ("layers", "experts", "topk", "hidden")},
        "tis_clip": [ns.tis_clip_low, ns.tis_clip],
        **{f"{name}_{k}": v for name, case in cases.items() for k, v in case.items()},
    }
    bf16, fp32 = cases["bf16"], cases["fp32"]
    ok = (
        bf16["absdiff_rollout_only"] > 0
        and bf16["tis_clipfrac_rollout_only"] > 0
        and bf16["absdiff_unified"] <= bf16["absdiff_rollout_only"] / 5
        and bf16["tis_clipfrac_unified"] < bf16["tis_clipfrac_rollout_only"]
    )
    result["fp32_ok"] = bool(
        fp32["absdiff_unified"] <= fp32["absdiff_rollout_only"] / 5
        and fp32["tis_clipfrac_unified"] <= fp32["tis_clipfrac_rollout_only"] / 5
    )
    result["ok"] = bool(ok)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
