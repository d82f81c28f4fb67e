"""`miles train` end to end on a tiny checkpoint: outputs, resume, and one clear sentence per bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from miles_core.cli import main


def base_argv(ckpt: Path, data: Path, run_dir: Path, reward: Path, n_rollout: int = 2) -> list[str]:
    return [
        "train",
        "--hf-checkpoint",
        str(ckpt),
        "--prompt-data",
        str(data),
        "--input-key",
        "prompt",
        "--label-key",
        "label",
        "--apply-chat-template",
        "--rollout-batch-size",
        "2",
        "--n-samples-per-prompt",
        "4",
        "--num-rollout",
        str(n_rollout),
        "--rollout-max-response-len",
        "6",
        "--custom-rm-path",
        str(reward),
        "--lr",
        "1e-3",
        "--micro-batch-size",
        "4",
        "--run-dir",
        str(run_dir),
        "--rollout-shuffle",
    ]


def run_example(tmp_path, config: str) -> tuple[dict, list[dict]]:
    """Run ``examples/<config>`` on the shipped demo checkpoint and data; returns its summary and the
    rows of its metrics.jsonl."""
    repo = Path(__file__).resolve().parent.parent
    arith, run = repo / "examples" / "arith", tmp_path / Path(config).stem
    argv = ["train", "--config", str(repo / "examples" / config), "--run-dir", str(run)]
    argv += ["--save-interval", "1000", "--hf-checkpoint", str(arith / "checkpoint")]
    argv += ["--prompt-data", str(arith / "data" / "train.jsonl")]
    argv += ["--eval-prompt-data", "arith", str(arith / "data" / "test.jsonl")]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), rows


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("miles: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_a_run_leaves_no_open_descriptors(tiny_ckpt, prompts_file, reward_file, tmp_path):
    """A finished run closes what it opened: reward worker loops (an epoll descriptor and a socket pair
    each), log files. A test process runs hundreds of runs, and select() refuses descriptors past 1024."""
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "warm", reward_file)
    assert main(argv) == 0  # first-use caches (fonts, plugins) open what they keep
    before = len(os.listdir("/proc/self/fd"))
    assert main(base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward_file)) == 0
    assert len(os.listdir("/proc/self/fd")) - before <= 2


def test_run_writes_outputs(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = base_argv(tiny_ckpt, prompts_file, run, reward_file) + [
        "--eval-prompt-data",
        "toy",
        str(prompts_file),
        "--eval-temperature",
        "0",
    ]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["num_eval_problems"] == 40 and summary["accuracy_before"] is not None
    assert {"accuracy_after", "wall_s"} <= set(summary)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/pg_loss" in x for x in lines) and any("eval/toy/accuracy" in x for x in lines)
    for x in (x for x in lines if "perf/step_time" in x):  # the whole step holds its parts
        parts = x["rollout/time_s"] + x["perf/train_time"] + x["perf/update_weights_time"]
        assert parts <= x["perf/step_time"] < parts + 5.0, x
    assert sum("perf/step_time" in x for x in lines) == summary["num_rollout"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "final_hf" / "model.safetensors").is_file() and (
        run / "final_hf" / "tokenizer.json"
    ).is_file()


# Two optimizer steps a rollout, with a warm-up that spans the first leg's 4 steps then cosine decay: the
# resumed leg's learning rates depend on the restored step count. (The decay horizon follows
# --num-rollout, which the first leg sets lower, so the warm-up covers exactly the steps it takes.)
LR_SCHEDULE = ["--global-batch-size", "4", "--lr-warmup-iters", "4", "--lr-decay-style", "cosine"]


@pytest.mark.parametrize("extra", [LR_SCHEDULE, ["--bf16"]], ids=["fp32-warmup-cosine", "bf16-masters"])
def test_resume_matches_uninterrupted_run(tiny_ckpt, prompts_file, reward_file, tmp_path, extra):
    """The resumed run goes on at the interrupted step of the LR schedule, with the optimizer state of
    that step. Also with --bf16: the checkpoint's weights are bf16, its optimizer state restores the fp32
    masters, so the resumed run ends on the same weights."""
    straight = tmp_path / "straight"
    assert main(base_argv(tiny_ckpt, prompts_file, straight, reward_file, 4) + extra) == 0
    split = tmp_path / "split"
    ckpts = tmp_path / "ckpts"
    argv = base_argv(tiny_ckpt, prompts_file, split, reward_file, 2) + [
        "--save",
        str(ckpts),
        "--save-interval",
        "1",
        *extra,
    ]
    assert main(argv) == 0
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    argv = base_argv(tiny_ckpt, prompts_file, split, reward_file, 4) + [
        "--save",
        str(ckpts),
        "--load",
        str(ckpts),
        *extra,
    ]
    assert main(argv) == 0
    a = load_file(straight / "final_hf" / "model.safetensors")
    b = load_file(split / "final_hf" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    ra = [r["rollout/reward_mean"] for r in rows(straight)]
    rb = [r["rollout/reward_mean"] for r in rows(split)]
    assert ra == rb and len(ra) == 4
    lrs = [[r["train/lr"] for r in rows(p)] for p in (straight, split)]
    assert lrs[0] == lrs[1] and (len(set(lrs[0])) > 1) == (extra == LR_SCHEDULE)


def test_unknown_flag(capsys):
    msg = error_of(capsys, ["train", "--rollout-batch-sise", "4"])
    assert "--rollout-batch-sise" in msg and "--rollout-batch-size" in msg


def test_missing_checkpoint_folder(prompts_file, reward_file, tmp_path, capsys):
    msg = error_of(capsys, base_argv(tmp_path / "nope", prompts_file, tmp_path / "r", reward_file))
    assert str(tmp_path / "nope") in msg


def test_missing_weights_file(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ck"))
    (ckpt / "model.safetensors").unlink()
    msg = error_of(capsys, base_argv(ckpt, prompts_file, tmp_path / "r", reward_file))
    assert "safetensors" in msg


def test_malformed_row_names_line(tiny_ckpt, reward_file, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "label": "1"}\n{"prompt": "b", "label": \n')
    msg = error_of(capsys, base_argv(tiny_ckpt, data, tmp_path / "r", reward_file))
    assert f"{data}:2" in msg


def test_missing_input_key(tiny_ckpt, reward_file, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "a", "label": "1"}\n')
    msg = error_of(capsys, base_argv(tiny_ckpt, data, tmp_path / "r", reward_file))
    assert "prompt" in msg and "--input-key" in msg


def test_empty_dataset(tiny_ckpt, reward_file, tmp_path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    msg = error_of(capsys, base_argv(tiny_ckpt, data, tmp_path / "r", reward_file))
    assert "no rows" in msg


def test_layout_refused(capsys):
    msg = error_of(capsys, ["train", "--tensor-model-parallel-size", "2"])
    assert "--tensor-model-parallel-size" in msg


def test_config_file(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rollout-batch-sise: 4\n")
    msg = error_of(capsys, ["train", "--config", str(cfg)])
    assert "rollout-batch-sise" in msg


def test_raising_reward_marks_failed_and_continues(tiny_ckpt, prompts_file, tmp_path, capsys):
    bad = tmp_path / "bad_reward.py"
    bad.write_text(
        "async def reward(args, sample):\n    if sample.index % 2:\n        raise ValueError('boom')\n"
        "    return 1.0\n"
    )
    run = tmp_path / "run"
    assert main(base_argv(tiny_ckpt, prompts_file, run, bad)) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["rollout/reward_failed"] == 4.0 and lines[0]["rollout/failed_frac"] == 0.5
    assert "boom" in capsys.readouterr().err
    # When every sample fails there is nothing to train on: the run stops with one sentence.
    bad.write_text("async def reward(args, sample):\n    raise ValueError('boom')\n")
    msg = error_of(capsys, base_argv(tiny_ckpt, prompts_file, tmp_path / "run2", bad))
    assert "every sample of rollout 0 failed (8 of 8)" in msg and "raised ValueError: boom" in msg


@pytest.mark.parametrize("form", ["file", "file:func", "pkg.mod:func", "pkg.mod.func"])
def test_custom_rm_path_forms(tiny_ckpt, prompts_file, tmp_path, monkeypatch, form):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "async def {name}(args, sample):\n    return 1.0\n"
    (pkg / "rm.py").write_text(body.format(name="reward") + body.format(name="score"))
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = {
        "file": str(pkg / "rm.py"),
        "file:func": f"{pkg / 'rm.py'}:score",
        "pkg.mod:func": "mypkg.rm:score",
        "pkg.mod.func": "mypkg.rm.score",
    }[form]
    run = tmp_path / "run"
    argv = base_argv(tiny_ckpt, prompts_file, run, Path("unused"), 1)
    argv[argv.index("--custom-rm-path") + 1] = spec
    assert main(argv) == 0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rollout/reward_mean"] == 1.0


def test_convert_without_plugin_says_where_to_look(tiny_ckpt, tmp_path, capsys):
    msg = error_of(
        capsys,
        ["convert", "--hf-checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "o"), "--to", "nonesuch"],
    )
    assert "no installed plugin converts --to nonesuch" in msg and "miles plugins" in msg


def test_train_py_shim_shows_help():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "train.py", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0 and "--rollout-batch-size" in out.stdout


@pytest.mark.parametrize("flag,compiled", [([], False), (["--rollout-compile"], True)])
def test_rollout_compile_flag_reaches_the_engine(
    tiny_ckpt, prompts_file, reward_file, tmp_path, flag, compiled
):
    from miles_core.args import parse_args
    from miles_core.loop import build_run
    from miles_core.plugins import get_plugin_manager

    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    args = parse_args(base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward_file)[1:] + flag, pm)
    run = build_run(args, pm)
    # On CPU the static-shape step runs only when compiled (CUDA graphs need CUDA).
    assert run.engine.compile is compiled and run.engine.cuda_graph is compiled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fused_moe_on_cpu_is_refused_in_one_sentence(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "r", reward_file) + ["--rollout-fused-moe"]
    msg = error_of(capsys, argv)
    assert "--rollout-fused-moe" in msg and "drop the flag" in msg
