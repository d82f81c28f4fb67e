"""--true-on-policy-mode end to end on CPU: multi-rollout GRPO runs of the demo MoE checkpoint and of a dense
Qwen3, with continuous batching (more samples than decode slots), packed or padded micro-batches of
several sizes, several optimizer steps per rollout and activation recompute, log a train/rollout
log-prob difference and KL of exactly 0.0 at every rollout. Also: the flags the mode refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import DEMO_CKPT, REPO, make_checkpoint

from miles_core.args import parse_args
from miles_core.cli import main
from miles_core.plugins import get_plugin_manager
from miles_core.testing import one_torch_thread  # noqa: F401  (an autouse fixture: tiny models, busy CPU)
from miles_core.train.on_policy import configure_model
from miles_core.types import UsageError

DATA = REPO / "examples" / "arith" / "data" / "train.jsonl"


def _argv(ckpt: Path, run: Path, extra: list[str]) -> list[str]:
    return [
        "train", "--hf-checkpoint", str(ckpt), "--prompt-data", str(DATA), "--input-key", "prompt",
        "--label-key", "label", "--apply-chat-template", "--rollout-shuffle", "--rm-type", "math",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "4", "--num-rollout", "3",
        "--rollout-max-response-len", "8", "--rollout-max-batch-size", "3", "--lr", "3e-4",
        "--run-dir", str(run), "--true-on-policy-mode", *extra,
    ]  # fmt: skip


def _mismatch_rows(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/train_rollout_logprob_abs_diff" in r]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("dense") / "qwen3", architectures=["Qwen3ForCausalLM"], model_type="qwen3"
    )


PACKED = ["--use-dynamic-batch-size", "--max-tokens-per-gpu"]
CASES = [
    # packed micro-batches of at most 60 tokens (2-4 samples), 2 optimizer steps a rollout, full recompute
    pytest.param("moe", [*PACKED, "60", "--num-steps-per-rollout", "2", "--recompute-granularity", "full"],
                 id="moe-packed"),
    # padded micro-batches of 2 samples, tempered top-k sampling
    pytest.param("dense", ["--micro-batch-size", "2", "--rollout-temperature", "0.8", "--rollout-top-k",
                           "20"], id="dense-padded"),
    pytest.param("dense", [*PACKED, "45", "--recompute-activations"], id="dense-packed"),
    pytest.param("moe", ["--micro-batch-size", "8", "--rollout-top-p", "0.9"], id="moe-padded"),
]  # fmt: skip


@pytest.mark.parametrize("model,extra", CASES)
def test_grpo_run_logs_zero_mismatch_at_every_rollout(model, extra, dense_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_argv(DEMO_CKPT if model == "moe" else dense_ckpt, run, extra)) == 0, capsys.readouterr().err
    rows = _mismatch_rows(run)
    assert len(rows) == 3
    for r in rows:
        assert r["train/train_rollout_logprob_abs_diff"] == 0.0, r
        assert r["train/train_rollout_kl"] == 0.0, r
        if "--num-steps-per-rollout" not in extra:  # one step: the training forward is the rollout's too
            assert r["train/ppo_kl"] == 0.0 and r["train/pg_clipfrac"] == 0.0, r


GPU_CASES = [
    # packed micro-batches, CUDA graphs on (the default), tempered sampling, 2 optimizer steps a rollout
    pytest.param("moe", [*PACKED, "60", "--rollout-temperature", "0.8", "--num-steps-per-rollout", "2"],
                 id="moe-packed"),
    pytest.param("dense", ["--micro-batch-size", "4", "--rollout-top-p", "0.9", "--recompute-activations"],
                 id="dense-padded"),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [[], ["--bf16"]], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model,extra", GPU_CASES)
def test_grpo_run_on_cuda_logs_zero_mismatch_at_every_rollout(model, extra, dtype, dense_ckpt, tmp_path,
                                                               capsys):  # fmt: skip
    # The Triton kernels on both sides; the engine decodes through CUDA graphs (the experts read no counts).
    run = tmp_path / "run"
    argv = _argv(DEMO_CKPT if model == "moe" else dense_ckpt, run, [*extra, *dtype, "--device", "cuda"])
    assert main(argv) == 0, capsys.readouterr().err
    rows = _mismatch_rows(run)
    assert len(rows) == 3
    for r in rows:
        assert r["train/train_rollout_logprob_abs_diff"] == 0.0, r
        assert r["train/train_rollout_kl"] == 0.0, r


@pytest.mark.parametrize("flag", ["--train-compile", "--rollout-compile", "--rollout-fused-moe"])
def test_refused_flags_name_themselves(flag):
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    with pytest.raises(UsageError, match=f"{flag} runs kernels that are not batch-invariant"):
        parse_args(["--hf-checkpoint", "x", "--true-on-policy-mode", flag], pm)


def test_other_rollout_backends_are_refused():
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    with pytest.raises(UsageError, match="--rollout-backend torch"):
        parse_args(["--hf-checkpoint", "x", "--true-on-policy-mode", "--rollout-backend", "http"], pm)


def test_bf16_model_on_cpu_is_refused_and_mode_off_leaves_model_alone():
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    args = parse_args(["--hf-checkpoint", "x", "--true-on-policy-mode", "--bf16"], pm)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(UsageError, match="fp32 only"):
        configure_model(args=args, model=model, role="rollout")
    args = parse_args(["--hf-checkpoint", "x"], pm)
    configure_model(args=args, model=model, role="train")
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.slow
def test_scaled_out_run_logs_zero_mismatch(tiny_ckpt, prompts_file, reward_file, tmp_path):
    # 2 FSDP2 trainer ranks and 1 engine actor, each a process of its own (Ray, CPU): same ops, same bits.
    pytest.importorskip("ray")
    from scaled_out_helpers import finish, rollouts, start, train_argv

    run, log = tmp_path / "run", tmp_path / "train.log"
    layout = ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "1", "--true-on-policy-mode"]
    argv = train_argv(run, tiny_ckpt, prompts_file, reward_file, "--num-rollout", "2", *layout)
    assert finish(start(argv, log)) == 0, log.read_text()[-3000:]
    rows = rollouts(run)
    assert len(rows) == 2
    for r in rows:
        assert r["train/train_rollout_logprob_abs_diff"] == 0.0 and r["train/train_rollout_kl"] == 0.0, r
