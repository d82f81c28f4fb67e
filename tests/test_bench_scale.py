"""The multi-device benches on CPU ranks: bench/scale.py (GRPO steps of `miles train --use-ray` per layout
of N devices) and bench/train_scale.py (FSDP2 trainer ranks). Their arithmetic (layouts, warm-up rows,
efficiency against the right baseline) is checked on made-up numbers; two runs (scale.py's is slow)
use 1 and 2 CPU ranks and recompute every derived number from the ones they print."""

from __future__ import annotations

import json
import sys

import pytest
from test_bench_smoke import ROOT, _run

sys.path.insert(0, str(ROOT / "bench"))
import scale  # noqa: E402
import train_scale  # noqa: E402


def test_layouts_split_n_devices_as_the_docstring_says():
    assert scale.layout("colocate", 1) == (["--actor-num-gpus-per-node", "1", "--colocate"], 1, 1)
    assert scale.layout("disagg", 4) == (["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2"], 2, 2)
    assert scale.layout("disagg", 2)[1:] == (1, 1)
    assert isinstance(scale.layout("disagg", 1), str) and isinstance(scale.layout("disagg", 3), str)


def test_scale_efficiency_is_against_the_smallest_layout_of_its_own_mode():
    rows = [
        {"mode": "colocate", "gpus": 4, "samples_s": 8.0},
        {"mode": "disagg", "gpus": 2, "samples_s": 10.0},
        {"mode": "colocate", "gpus": 1, "samples_s": 4.0},
        {"mode": "disagg", "gpus": 4, "samples_s": 15.0},
        {"mode": "colocate", "gpus": 2, "samples_s": 6.0},
    ]
    # disagg's baseline is its 2 GPUs (not colocate's 1); a flipped ratio would give 1.33 / 2.0.
    assert scale.efficiency(rows) == {
        "colocate": {"1": 1.0, "2": 0.75, "4": 0.5},
        "disagg": {"2": 1.0, "4": 0.75},
    }


def test_train_scale_efficiency_is_against_the_fewest_ranks():
    rows = [{"ranks": 8, "tok_s": 60.0}, {"ranks": 2, "tok_s": 20.0}, {"ranks": 4, "tok_s": 36.0}]
    assert train_scale.efficiency(rows) == {"8": 0.75, "2": 1.0, "4": 0.9}


def test_scale_measures_only_the_rollouts_after_the_warmup(tmp_path):
    def row(step, seconds, n, length):
        return {"step": step, "perf/step_time": seconds, "rollout/num_samples": n,
                "rollout/response_len_mean": length, "rollout/time_s": seconds / 2,
                "perf/train_time": seconds / 4, "perf/update_weights_time": seconds / 8}  # fmt: skip

    rows = [row(1, 100.0, 8, 4), row(2, 2.0, 8, 16), {"step": 2, "eval/x": 1.0}, row(3, 6.0, 8, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = scale.measure(tmp_path, warmup=1)
    assert m["s_per_step"] == 4.0 and m["samples_s"] == 2.0  # 16 samples in 8 s: step 1 left out
    assert m["tokens_s"] == (8 * 16 + 8 * 8) / 8.0 and m["train_s"] == 1.0


@pytest.mark.parametrize(
    "script,argv,flag",
    [("scale.py", ["--device", "cuda", "--gpus", "1,64"], "--gpus"),
     ("train_scale.py", ["--preset", "qwen3-30b-a3b", "--ranks", "64"], "--ranks")],
)  # fmt: skip
def test_benches_refuse_more_gpus_than_are_visible(script, argv, flag):
    module = scale if script == "scale.py" else train_scale
    with pytest.raises(SystemExit) as e:
        module.parse(argv)
    assert str(e.value).startswith(f"{flag} asks for 64 GPUs and this machine shows ")


def _check_scale(r: dict) -> None:
    by = {(x["mode"], x["gpus"]): x for x in r["layouts"]}
    assert set(by) == {("disagg", 2), ("colocate", 1), ("colocate", 2)}
    assert r["skipped"] and "disagg on 1 GPU" in r["skipped"][0]
    assert by["colocate", 2]["samples_per_step"] == 2 * by["colocate", 1]["samples_per_step"]  # weak
    for x in r["layouts"]:
        assert x["samples_s"] == pytest.approx(x["samples_per_step"] / x["s_per_step"], rel=1e-2)
        assert x["tokens_s"] == pytest.approx(x["samples_s"] * x["response_len_mean"], rel=1e-2)
        assert x["s_per_step"] >= x["train_s"] + x["update_weights_s"] + x["rollout_s"] - 1e-3
    c1, c2 = by["colocate", 1]["samples_s"], by["colocate", 2]["samples_s"]
    assert r["efficiency"] == {
        "disagg": {"2": 1.0},
        "colocate": {"1": 1.0, "2": pytest.approx(c2 / (2 * c1), rel=1e-2)},
    }
    assert all(x["efficiency"] == r["efficiency"][x["mode"]][str(x["gpus"])] for x in r["layouts"])


@pytest.mark.slow
def test_scale_bench_runs_each_layout_on_cpu_ranks():
    _check_scale(_run("scale.py", "--gpus", "1,2", "--steps", "2", "--warmup", "1"))


def test_train_scale_bench_times_one_and_two_cpu_ranks():  # ~15 s: two worlds of spawned ranks
    r = _run("train_scale.py", "--ranks", "1,2", "--steps", "1")
    assert r["backend"] == "gloo" and r["layers"] == 2 and [x["ranks"] for x in r["ranks"]] == [1, 2]
    one, two = r["ranks"]
    for x in r["ranks"]:
        assert x["tok_s"] == pytest.approx(r["tokens_per_rank"] * x["ranks"] / x["step_s"], rel=1e-2)
        assert x["tok_s_per_gpu"] == pytest.approx(x["tok_s"] / x["ranks"], rel=1e-2)
        assert x["mfu"] == pytest.approx(x["tflops_per_gpu"] / r["peak_tflops"], rel=2e-2) and x["mfu"] > 0
    assert r["efficiency"] == {"1": 1.0, "2": pytest.approx(two["tok_s"] / (2 * one["tok_s"]), rel=1e-2)}
