"""The plugin's flags, its refusal of miles' environment switches, role swaps, and a short `miles train`
run comparing the train/rollout log-prob mismatch of a BF16 rollout with INT4 rollouts (with and without
QAT)."""

from __future__ import annotations

import json

import pytest
from int4_helpers import checkpoint, plugin_manager, tiny_moe
from miles_int4qat import plugin
from miles_int4qat.fake_quant import FakeQuantExperts
from miles_int4qat.modules import Int4Experts

import miles_core.plugins
from miles_core import UsageError, cli
from miles_core.args import parse_args
from miles_core.plugins import configure_plugins


def _args(*flags: str, env: dict | None = None, monkeypatch=None):
    for key in plugin.LEGACY_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    pm = plugin_manager()
    args = parse_args(list(flags), pm)
    return pm, args, configure_plugins(pm, args)


def test_flags_and_env(monkeypatch):
    _, args, active = _args(monkeypatch=monkeypatch)
    assert not active["miles_int4qat.plugin"] and args.int4_group_size == 128 and args.int4_scope == "experts"
    _, args, active = _args("--int4-qat", monkeypatch=monkeypatch)
    assert active["miles_int4qat.plugin"] and args.int4_rollout
    _, args, _ = _args("--int4-rollout", "--int4-group-size", "32", monkeypatch=monkeypatch)
    assert args.int4_rollout and not args.int4_qat and args.int4_group_size == 32
    # miles' environment switches never turn QAT on silently: a set one is refused in one sentence.
    for key in plugin.LEGACY_ENV:
        with pytest.raises(UsageError, match=rf"^{key} is set, but miles-int4qat is switched by flags only"):
            _args(env={key: "1"}, monkeypatch=monkeypatch)
    with pytest.raises(UsageError, match="positive multiple of 8"):
        _args("--int4-group-size", "20", monkeypatch=monkeypatch)
    for flag in ("--int4-qat", "--int4-rollout"):
        with pytest.raises(UsageError, match="not batch-invariant, so --true-on-policy-mode"):
            _args(flag, "--true-on-policy-mode", monkeypatch=monkeypatch)


def test_configure_model_swaps_per_role(monkeypatch):
    pm, args, _ = _args("--int4-qat", "--int4-group-size", "16", monkeypatch=monkeypatch)
    train, rollout = tiny_moe(), tiny_moe()
    pm.hook.configure_model(args=args, model=train, role="train")
    pm.hook.configure_model(args=args, model=rollout, role="rollout")
    assert isinstance(train.model.layers[0].mlp.experts, FakeQuantExperts)
    assert isinstance(rollout.model.layers[0].mlp.experts, Int4Experts)
    metrics = pm.hook.rollout_metrics(args=args, rollout_id=0, samples=[])
    got = {k: v for d in metrics if d for k, v in d.items()}
    assert 0 < got["int4/rollout_weight_bytes"] * 2 < got["int4/bf16_weight_bytes"]

    pm, args, _ = _args("--int4-rollout", "--int4-group-size", "16", monkeypatch=monkeypatch)
    train = tiny_moe()
    pm.hook.configure_model(args=args, model=train, role="train")  # no QAT: training untouched
    assert type(train.model.layers[0].mlp.experts).__name__ == "Experts"


def test_demo_sized_model_with_default_group_size_fails_clearly(monkeypatch):
    pm, args, _ = _args("--int4-qat", monkeypatch=monkeypatch)
    with pytest.raises(
        UsageError, match=r"--int4-group-size 128 does not divide the input dimension 96 .*e\.g\. 32"
    ):
        pm.hook.configure_model(args=args, model=tiny_moe(hidden=96, inter=96), role="train")


def _short_run(tmp_path, ckpt, name: str, *flags: str) -> float:
    data = tmp_path / "prompts.jsonl"
    if not data.exists():
        rows = [json.dumps({"input": f"{a}+{a + 1}=", "label": str(2 * a + 1)}) for a in range(8)]
        data.write_text("\n".join(rows) + "\n")
        (tmp_path / "rm.py").write_text(
            "async def reward(args, sample):\n    return float(len(sample.response) % 2)\n"
        )
    run_dir = tmp_path / name
    rc = cli.main(
        [
            "train", "--hf-checkpoint", str(ckpt), "--prompt-data", str(data), "--label-key", "label",
            "--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--num-rollout", "2",
            "--rollout-max-response-len", "8", "--custom-rm-path", str(tmp_path / "rm.py"),
            "--run-dir", str(run_dir), "--device", "cpu", "--rollout-dtype", "bfloat16",
            "--micro-batch-size", "8", "--lr", "1e-3", *flags,
        ]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    diffs = [
        r["train/train_rollout_logprob_abs_diff"] for r in rows if "train/train_rollout_logprob_abs_diff" in r
    ]
    assert len(diffs) == 2
    return sum(diffs) / len(diffs)


def test_short_run_mismatch_with_int4_qat_is_within_2x_of_bf16(tmp_path, monkeypatch):
    for key in plugin.LEGACY_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(miles_core.plugins, "get_plugin_manager", lambda **kw: plugin_manager())
    ckpt = checkpoint(tmp_path)
    bf16 = _short_run(tmp_path, ckpt, "bf16")
    qat = _short_run(tmp_path, ckpt, "qat", "--int4-qat", "--int4-group-size", "16")
    no_qat = _short_run(tmp_path, ckpt, "noqat", "--int4-rollout", "--int4-group-size", "16")
    print(json.dumps({"bf16": bf16, "int4_qat": qat, "int4_rollout_no_qat": no_qat}))
    assert 0 < bf16 and qat <= 2 * bf16
    assert no_qat > qat  # without QAT the trainer computes log-probs of a different (unquantized) policy
