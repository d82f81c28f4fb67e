"""Debug modes end to end on the demo checkpoint: rollout only, saved rollouts, training on them (bitwise the
same weights), and one sentence for each combination that cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from miles_core import loop
from miles_core.cli import main
from miles_core.rollout.dumps import load_rollout, sample_from_dict, sample_to_dict, save_rollout
from miles_core.types import Sample, Status

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "arith"


@pytest.fixture
def label_reward(tmp_path) -> Path:
    path = tmp_path / "reward.py"
    # The demo model answers most prompts the same way every time; the index term keeps advantages nonzero.
    body = "    return float(sample.label in sample.response) + 0.5 * (sample.index % 2)\n"
    path.write_text("async def reward(args, sample):\n" + body)
    return path


def demo_argv(run_dir: Path, reward: Path | None, n_rollout: int = 2, data: bool = True) -> list[str]:
    argv = ["train", "--hf-checkpoint", str(DEMO / "checkpoint"), "--input-key", "prompt",
            "--label-key", "label", "--apply-chat-template", "--rollout-batch-size", "2",
            "--n-samples-per-prompt", "4", "--num-rollout", str(n_rollout), "--rollout-max-response-len", "8",
            "--lr", "1e-3", "--micro-batch-size", "4", "--global-batch-size", "4", "--run-dir", str(run_dir),
            "--rollout-shuffle", "--device", "cpu"]  # fmt: skip
    if data:
        argv += ["--prompt-data", str(DEMO / "data" / "train.jsonl")]
    if reward is not None:
        argv += ["--custom-rm-path", str(reward)]
    return argv


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("miles: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_sample_round_trips_every_field(tmp_path):
    routes = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
    s = Sample(group_index=3, index=7, prompt=[{"role": "user", "content": "hi"}], tokens=[5, 6, 7],
               response="x", response_length=2, label="12", reward={"acc": 1.0, "fmt": 0.25},
               loss_mask=[1, 0], weight_versions=[4], response_weight_versions=[4, -1],
               rollout_log_probs=[-0.1234567890123, -2.5e-9], rollout_routed_experts=routes,
               status=Status.TRUNCATED, metadata={"k": [1, "a"]}, spec_info={"accepted": 3},
               sampling_params={"temperature": 0.7, "top_p": 1.0, "top_k": -1})  # fmt: skip
    save_rollout(str(tmp_path / "d" / "{rollout_id}.pt"), 5, [s])
    (back,) = load_rollout(str(tmp_path / "d" / "{rollout_id}.pt"), 5)
    assert back.status is Status.TRUNCATED and isinstance(back.rollout_routed_experts, np.ndarray)
    assert (
        np.array_equal(back.rollout_routed_experts, routes) and back.rollout_routed_experts.dtype == np.int32
    )
    back.rollout_routed_experts = s.rollout_routed_experts = None
    assert back == s
    assert sample_from_dict(sample_to_dict(Sample()), "x") == Sample()


def test_saved_rollouts_retrain_to_the_same_weights(label_reward, tmp_path, monkeypatch):
    """Run A generates, saves and trains 2 rollouts; run B trains on A's files with no engine, no prompt data
    and no reward, and ends on bitwise the same weights (a replay of rollout 0 twice, or of another
    rollout's samples, would not); so does run C, given A's flags plus eval ones."""
    dumps = str(tmp_path / "dumps" / "rollout_{rollout_id}.pt")
    a = tmp_path / "a"
    assert main(demo_argv(a, label_reward) + ["--save-debug-rollout-data", dumps]) == 0
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["rollout_0.pt", "rollout_1.pt"]
    r0, r1 = load_rollout(dumps, 0), load_rollout(dumps, 1)
    assert len(r0) == 8 and [s.tokens for s in r0] != [s.tokens for s in r1]

    def no_engine(name):
        raise AssertionError("--debug-train-only must not build a rollout engine")

    monkeypatch.setattr(loop.drivers, "get_rollout_backend", no_engine)
    b = tmp_path / "b"
    assert main(demo_argv(b, None, data=False) + ["--load-debug-rollout-data", dumps]) == 0
    # The saving run's own flags replay too: its prompt data, reward and eval flags are not read.
    c = tmp_path / "c"
    evals = ["--eval-prompt-data", "arith", str(DEMO / "data" / "test.jsonl"), "--eval-interval", "1"]
    assert main(demo_argv(c, label_reward) + evals + ["--load-debug-rollout-data", dumps]) == 0
    assert not any(k.startswith("eval/") for r in rows(c) for k in r)
    wa, wb, wc = (load_file(p / "final_hf" / "model.safetensors") for p in (a, b, c))
    w0 = load_file(DEMO / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # it trained
    ra, rb = rows(a), rows(b)
    assert [r["rollout/reward_mean"] for r in ra] == [r["rollout/reward_mean"] for r in rb]
    assert [r["train/pg_loss"] for r in ra] == [r["train/pg_loss"] for r in rb]
    assert "rollout/time_s" in ra[0] and "rollout/time_s" not in rb[0]


def test_debug_rollout_only_builds_no_trainer(label_reward, tmp_path, monkeypatch):
    """Three rollouts at the first weights, the third beyond --max-weight-staleness 1 of a version count
    that never moves: none is dropped as stale, nothing trains, no model is written."""

    def no_policy(*a, **k):
        raise AssertionError("--debug-rollout-only must not build the policy")

    monkeypatch.setattr(loop, "load_train_models", no_policy)
    run = tmp_path / "run"
    dumps = str(tmp_path / "d{rollout_id}.pt")
    argv = demo_argv(run, label_reward, n_rollout=3) + [
        "--debug-rollout-only",
        "--save-debug-rollout-data",
        dumps,
    ]
    assert main(argv) == 0
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert all(r["rollout/failed_frac"] == 0 and r["rollout/num_samples"] == 8 for r in got)
    assert not any(k.startswith("train/") for r in got for k in r)
    assert not (run / "final_hf").exists()
    assert json.loads((run / "summary.json").read_text())["final_checkpoint"] is None
    assert len(load_rollout(dumps, 2)) == 8


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--debug-train-only"], "add --load-debug-rollout-data"),
        (["--debug-rollout-only", "--debug-train-only"], "exclude each other"),
        (["--debug-rollout-only", "--load-debug-rollout-data", "x.pt"], "drop one of them"),
        (["--save-debug-rollout-data", "d.pt"], "put {rollout_id} in the path"),
        (["--save-debug-rollout-data", "d{step}.pt"], "only the placeholder {rollout_id}"),
        (["--debug-rollout-only", "--save", "ckpts"], "nothing for --save to write"),
        (["--debug-rollout-only", "--async"], "drop --async"),
        (["--load-debug-rollout-data", "x{rollout_id}.pt", "--use-ray"], "drop --use-ray"),
    ],
)  # fmt: skip
def test_refused_combinations(capsys, tmp_path, label_reward, extra, needle):
    assert needle in error_of(capsys, demo_argv(tmp_path / "r", label_reward) + extra)


def test_missing_dump_is_one_sentence(capsys, tmp_path):
    argv = demo_argv(tmp_path / "r", None, data=False) + [
        "--load-debug-rollout-data",
        str(tmp_path / "{rollout_id}.pt"),
    ]
    assert "0.pt (rollout 0) does not exist" in error_of(capsys, argv)
