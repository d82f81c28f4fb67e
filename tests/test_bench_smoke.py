"""The benchmarks run on CPU with their small config and print one JSON line with the keys the speed
issue asks for (the numbers themselves are measured on GPU, see bench/README.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


PLUGINS = ("miles_fp8", "miles_int4qat", "miles_r3", "miles_rewards", "miles_specrl")


def _run(script: str, *args: str, preset: str | None = "cpu-small") -> dict:
    path = os.pathsep.join([str(ROOT), *(str(ROOT / "plugins" / p) for p in PLUGINS)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *(["--preset", preset] if preset else []), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"')]  # TRL logs Python dicts
    assert len(lines) == 1, out.stdout[-2000:]
    return json.loads(lines[0])


def test_rollout_bench_prints_its_json_line():
    r = _run("rollout.py", "--no-compile", "--compare-moe")
    assert {"device", "miles_tok_s", "hf_tok_s", "ratio", "roof_frac", "moe_decode"} <= r.keys()
    assert r["device"] == "cpu" and r["miles_tok_s"] > 0 and r["hf_tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["miles_tok_s"] / r["hf_tok_s"], rel=1e-2)
    assert 0 < r["roof_frac"] < 1


def test_served_rollout_bench_prints_its_json_line():
    r = _run("rollout.py", "--server", "--batch", "4", "--new-tokens", "8")
    assert {"device", "in_process_tok_s", "served_tok_s", "ratio", "clients"} <= r.keys()
    assert r["clients"] == 4 and r["served_tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["served_tok_s"] / r["in_process_tok_s"], rel=1e-2)


def test_async_grpo_bench_prints_its_json_line():
    r = _run("async_grpo.py", "--rollouts", "3")
    assert {"device", "sync_s_per_rollout", "async_s_per_rollout", "speedup"} <= r.keys()
    assert r["speedup"] == pytest.approx(r["sync_s_per_rollout"] / r["async_s_per_rollout"], rel=1e-2)


def test_weight_sync_bench_prints_its_json_line():
    """CPU: Gloo, one engine; the rates and the ratio follow from the printed bytes and seconds."""
    r = _run("weight_sync.py", "--allreduce-mib", "16", "--updates", "1")
    sys.path.insert(0, str(ROOT / "bench"))
    import rollout

    from miles_core.model import named_hf_tensors

    model = rollout.make_model(rollout.PRESETS["cpu-small"])
    assert r["bytes"] == sum(t.numel() * t.element_size() for _, t in named_hf_tensors(model))
    assert r["device"] == "cpu" and r["backend"] == "gloo" and r["engines"] == 1 and r["layers"] == 2
    assert r["host_copy_lag_s"] == 0  # Gloo keeps its host copy before it sends
    assert r["sync_gbs"] == pytest.approx(r["bytes"] / r["sync_s"] / 1e9, rel=1e-2)
    busbw = 2 * (2 - 1) / 2 * (16 << 20) / r["allreduce_s"] / 1e9  # trainer + 1 engine
    assert r["allreduce_busbw_gbs"] == pytest.approx(busbw, rel=1e-2)
    assert r["ratio"] == pytest.approx(r["sync_gbs"] / r["allreduce_busbw_gbs"], rel=1e-2)
    # NVLink multicast: off unless the caller's environment says otherwise
    assert r["nccl_env"].get("NCCL_NVLS_ENABLE") == os.environ.get("NCCL_NVLS_ENABLE", "0")


def test_weight_sync_bench_bus_bandwidth_is_nccl_tests_formula():
    spec = importlib.util.spec_from_file_location("bench_weight_sync", ROOT / "bench" / "weight_sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.bus_gbs(8, 2 * 10**9, 1.0) == pytest.approx(3.5)  # 2 * 7/8 * 2 GB / 1 s
    assert mod.bus_gbs(2, 10**9, 0.5) == pytest.approx(2.0)


def test_train_step_bench_prints_its_json_line():
    r = _run("train_step.py", "--steps", "1")
    assert {"device", "tok_s", "mfu"} <= r.keys()
    assert r["tok_s"] > 0 and 0 < r["mfu"] < 1


def test_train_step_bench_runs_unified_fp8_and_its_bf16_peer():
    r = _run("train_step.py", "--steps", "1", "--fp8-recipe", "blockwise", "--compare-bf16")
    assert r["fp8_recipe"] == "blockwise" and r["fp8_modules"] > 0 and r["tok_s"] > 0
    assert r["fp8_speedup"] == pytest.approx(r["tok_s"] / r["bf16_tok_s"], rel=1e-2)


def test_decode_profile_runs_on_cpu():
    r = _run("decode_profile.py", "--no-compile", "--steps", "1")
    assert r["device"] == "cpu" and r["batch"] > 0


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs trl (pip install trl)")
def test_grpo_vs_trl_bench_prints_its_json_line():
    r = _run("grpo_vs_trl.py")
    assert {"device", "miles_samples_s", "trl_samples_s", "ratio"} <= r.keys()


@pytest.mark.parametrize(
    "script,preset,keys",
    [
        ("fp8_rollout.py", "cpu-small",
         {"bf16_tok_s", "fp8_blockwise_expert_bytes", "fp8_blockwise_dense_path", "fp8_products", "layers"}),
        ("int4_rollout.py", "cpu-small", {"bf16_tok_s", "bf16_expert_bytes", "int4_cuda_graph", "layers"}),
        ("r3_mismatch.py", "cpu-small", {"mismatch_no_r3", "mismatch_r3"}),
        ("int4_memory.py", None, {"bf16_bytes", "int4_bytes", "ratio"}),
    ],
)  # fmt: skip
def test_plugin_benches_print_their_json_line(script, preset, keys):
    r = _run(script, preset=preset)
    assert r["device"] == "cpu" and r["bench"] == script.removesuffix(".py") and keys <= r.keys()


def test_fp8_mismatch_bench_pairs_each_engine_with_its_trainer_and_unified_cuts_the_gap_5x():
    r = _run("fp8_mismatch.py", preset=None)  # exit 0: the bf16 case's unified abs diff <= 1/5
    assert r["device"] == "cpu" and r["ok"] and r["fp32_ok"]
    trainers = {case: r[f"{case}_trainer_dtype"] for case in ("bf16", "fp32", "mixed")}
    assert trainers == {"bf16": "bfloat16", "fp32": "float32", "mixed": "float32"}
    assert r["bf16_absdiff_ratio"] >= 5 and r["fp32_absdiff_ratio"] >= 5
    # an fp32 trainer against the bf16 engine: bf16 rounding dominates, unified removes only the FP8 part
    assert r["mixed_absdiff_ratio"] < r["bf16_absdiff_ratio"]


def test_quant_experts_bench_prints_its_json_line_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = "--experts 4 --hidden 256 --inter 128 --tokens 8 --topk 2"
    r = _run("quant_experts.py", *shape.split(), preset=None)
    assert r["device"] == "cpu" and r["tokens"] == 8 and r["bf16_us"] > 0 and r["int4_us"] > 0
    # quantization error against the unquantized arm: FP8 ~6%, INT4 (group 128) ~20%; a dropped scale or a
    # wrong expert's weights gives ~100%
    assert 0 < r["fp8_fp32_rel_err"] < 0.15 and 0 < r["int4_rel_err"] < 0.4
    assert r["bf16_bytes"] == 4 * 3 * 4 * 256 * 128  # fp32 on CPU: gate, up, down of 4 experts
    assert r["int4_vs_bf16"] == pytest.approx(r["bf16_us"] / r["int4_us"], rel=1e-2)


def test_quant_experts_bench_times_int4_tile_settings_under_the_interpreter(monkeypatch):
    """The INT4 sweeps time each setting and get the default's numbers (only fp32 sum orders differ)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = "--experts 2 --hidden 128 --inter 128 --tokens 4 --topk 1"
    args = f"{shape} --int4-tiles 32:4:3:64 --int4-block-m 16,64"
    r = _run("quant_experts.py", *args.split(), preset=None)
    assert r["int4_swap_max_m"] == 64
    for key, labels in (("int4_sweep_gate_up", ["32:4:3:64"]), ("int4_sweep_down", ["32:4:3:64"]),
                        ("int4_sweep_block_m", ["16", "64"])):  # fmt: skip
        assert sorted(r[key]) == labels, key
        for entry in r[key].values():
            assert entry["us"] > 0 and entry["rel_err"] == pytest.approx(r["int4_rel_err"], abs=1e-4)


def test_invariant_mm_tune_bench_prints_its_json_line_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    r = _run("invariant_mm_tune.py", "--tiny", "--decode-rows", "3", "--train-rows", "70", preset=None)
    assert r["device"] == "cpu" and r["family"] == "fp32" and r["kept"] == ["m32n64", "m64n128"]
    shapes = {(s["op"], s["phase"]): s for s in r["shapes"]}
    assert len(shapes) == 8 and all(set(s["us"]) == set(r["kept"]) for s in shapes.values())
    # M = 3 picks the 32-row reference, M = 70 the 64x128 tile (N = 72 <= 128); the router's N = 8: reference
    assert shapes["q_o", "decode"]["picked"] == "m32n64" and shapes["q_o", "train"]["picked"] == "m64n128"
    assert shapes["router", "train"]["picked"] == "m32n64"
    experts = shapes["experts", "train"]  # 35 copies an expert: gate/up (N 72) 64x128, down (N 40) 32x64
    assert experts["picked"] == ["m64n128", "m32n64"] and experts["m"] == 140
    t = r["totals"]["train"]
    assert t["picked_vs_torch"] == pytest.approx(t["picked_us"] / t["torch_us"], rel=1e-2)


def test_invariant_attn_grad_bench_prints_its_json_line_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    r = _run("invariant_attn_grad.py", "--tiny", preset=None)
    assert r["device"] == "cpu" and set(r["fwd_bwd_ms"]) == {"triton", "torch_grad", "sdpa"}
    assert r["grad_rel_diff_vs_torch_grad"] < 1e-5  # fp32: the two backwards agree
    assert r["speedup_vs_torch_grad"] == pytest.approx(
        r["fwd_bwd_ms"]["torch_grad"] / r["fwd_bwd_ms"]["triton"], rel=2e-2
    )


def test_qwen3_30b_a3b_preset_has_the_model_shape():
    """The issue's shape: hidden 2048, 32 query / 4 KV heads of 128, 128 experts top-8, expert FFN 768,
    vocab 151936; the same in bench/rollout.py and in the quantized benches' presets."""
    sys.path.insert(0, str(ROOT / "bench"))
    import moe_config
    import rollout

    shape = dict(vocab=151936, hidden=2048, heads=32, kv=4, head_dim=128, experts=128, topk=8, inter=768)
    p = moe_config.ROLLOUT_PRESETS["qwen3-30b-a3b"]
    assert {k: p[k] for k in shape} == shape and p["layers"] == 8
    hf = rollout.PRESETS["qwen3-30b-a3b"]["config"]
    names = dict(vocab="vocab_size", hidden="hidden_size", heads="num_attention_heads",
                 kv="num_key_value_heads", head_dim="head_dim", experts="num_experts",
                 topk="num_experts_per_tok", inter="moe_intermediate_size")  # fmt: skip
    assert {k: hf[v] for k, v in names.items()} == shape and hf["num_hidden_layers"] == 8
    assert rollout._shared_preset("qwen3-30b-a3b") == "qwen3-30b-a3b"


GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "train.jsonl").is_file(), reason="needs ../shared/data/gsm8k")
def test_specrl_gpu_mode_runs_its_arms_on_a_small_target():
    """The GPU measurement of speculative decoding end to end on a tiny target: train it on GSM8K, train
    an MTP depth on its samples, decode with and without speculation (compiled arms skipped: slow)."""
    r = _run("specrl.py", "--mode", "gpu", "--target", "cpu-small", "--data", str(GSM8K), "--target-steps",
             "20", "--mtp-steps", "10", "--mtp-prompts", "8", "--target-batch", "4", "--seq-len", "512",
             "--batches", "2", "--new-tokens", "12", "--compile-batches", "", preset=None)  # fmt: skip
    for key in ("greedy", "t1"):
        assert r[f"b2_{key}_tok_s_nospec"] > 0 and r[f"b2_{key}_tok_s_spec"] > 0
        assert 1.0 <= r[f"b2_{key}_accept_len"] <= 4.0
    assert r["device"] == "cpu" and r["num_steps"] == 3


@pytest.mark.slow
def test_specrl_cpu_bench_prints_the_issue_keys():
    """The demo-task GRPO comparison (no speculation, frozen draft, online draft), shortened."""
    r = _run("specrl.py", "--rollouts", "8", "--warmup-steps", "60", preset=None)
    keys = {"accept_len_frozen", "accept_len_online", "tok_s_nospec", "tok_s_frozen", "tok_s_online"}
    assert keys <= r.keys() and all(r[k] > 0 for k in keys)
    assert 1.0 <= r["accept_len_frozen"] <= 4.0 and 1.0 <= r["accept_len_online"] <= 4.0


def _kernel_sass():
    spec = importlib.util.spec_from_file_location("kernel_sass", ROOT / "bench" / "kernel_sass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_sass_counts_the_innermost_loop_around_the_first_mma():
    """Hand-written SASS: an outer loop (.L_x_1) around an inner one (.L_x_2) holding the MMA; the count is
    the inner loop's 5 instructions from its label to its branch back, spills are counted kernel-wide."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   STL [R1], R2 ;
.L_x_2:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   IMAD R5, R5, 0x2, RZ ;
        /*0040*/                   QGMMA.64x16x32.F32.E4M3.E4M3 R32, gdesc[UR16], RZ, !UPT, gsb0 ;
        /*0050*/                   FADD R6, R6, R32 ;
        /*0060*/               @P0 BRA `(.L_x_2) ;
        /*0070*/                   LDL R2, [R1] ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
"""
    got = _kernel_sass().k_loop(sass)
    assert got["loop"] == 5 and got["spills"] == 2 and got["mma"] == "QGMMA.64x16x32.F32.E4M3.E4M3"
    assert got["opcodes"] == {"LDG": 1, "IMAD": 1, "QGMMA": 1, "FADD": 1, "BRA": 1}


def test_kernel_sass_bench_counts_the_fp8_decode_kernels_for_hopper():
    """AOT sm_90 compile on the CPU: the 16-row decode tiles run FP8 wgmma (QGMMA m64n16k32) in the fp8
    modes and fp16 wgmma (HGMMA k16) in fp16 mode, no spills, a few instructions per weight (the old 16-row
    tile on mma.sync with e4m3 upcast in the loop gave ~10); fp8acc drops the k32 promotion's FADDs."""
    mod = _kernel_sass()
    if isinstance(mod.tools(), str):
        pytest.skip(mod.tools())
    r = _run("kernel_sass.py", "--block-m", "16", "--only", "gate_up", "--opcodes", preset=None)
    v = r["variants"]
    modes = ("fp16", "fp8", "fp8acc")
    assert sorted(v) == [f"gate_up/{m}/m16/swap/{q}/n64" for m in modes for q in ("inkernel", "preq")]
    for name, row in v.items():
        kind = "HGMMA.64x16x16.F32" if "/fp16/" in name else "QGMMA.64x16x32.F32.E4M3.E4M3"
        assert row["mma"] == kind and row["spills"] == 0 and 0.5 < row["per_weight"] < 5, (name, row)
        assert row["per_weight"] == pytest.approx(row["loop"] / (2 * 64 * 128 / 128), abs=1e-3)
    for q in ("inkernel", "preq"):
        fp8, acc = v[f"gate_up/fp8/m16/swap/{q}/n64"], v[f"gate_up/fp8acc/m16/swap/{q}/n64"]
        assert fp8["opcodes"]["FADD"] >= 32 and "FADD" not in acc["opcodes"] and acc["loop"] < fp8["loop"]
