"""Async and partial rollout, and --rollout-timeout: per-token weight versions, the staleness bound, a
continuation under new weights that keeps tokens, log-probs, masks and versions aligned (as TIS sees
them), timeouts that abort instead of hanging, and `miles train --async` end to end."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from serve_client_helpers import client_over, wait_for
from test_cli import base_argv, error_of
from test_trainer import make_args

from miles_core.args import check_run_args, parse_args
from miles_core.cli import main
from miles_core.data import Tokenizer
from miles_core.engine import Engine
from miles_core.loop import build_run, make_train_batch
from miles_core.model import load_model
from miles_core.model.hf_io import named_hf_tensors
from miles_core.plugins import get_plugin_manager
from miles_core.rollout.async_loop import AsyncRollouts
from miles_core.rollout.generate import RolloutContext, rollout_context, single_turn
from miles_core.rollout.manager import staleness
from miles_core.testing import served
from miles_core.train.corrections import apply_icepop, apply_tis
from miles_core.train.losses import LossTerms
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status

LONG = 40  # response tokens of a request that is interrupted mid-way
PROMPT = [5, 6, 7]
REPO = Path(__file__).resolve().parents[1]


def pm():
    return get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})


@pytest.fixture()
def engine(tiny_ckpt):
    e = Engine(load_model(tiny_ckpt).eval(), Tokenizer.from_pretrained(tiny_ckpt), max_batch_size=4, seed=3)
    e._eos = set()  # every request runs its full length unless aborted
    return e


@pytest.fixture(scope="module")
def bumped(tiny_ckpt):
    """The policy after an update: every weight moved, so old and new log-probs differ visibly."""
    model = load_model(tiny_ckpt).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def context(engine, **kw) -> RolloutContext:
    return RolloutContext(engine=engine, tokenizer=engine.tokenizer, pm=pm(), **kw)


def generate_across_update(engine, ctx, new_model, mode: str, after: int = 5) -> Sample:
    """single_turn for one sample on a rollout thread, as --async runs it; from this thread, once `after`
    tokens were sampled, the weights become version 1 (pause in `mode`, update, continue)."""
    sample = Sample(group_index=0, index=0, tokens=list(PROMPT), reward=1.0)
    out = {}

    def rollout():
        async def go():
            with rollout_context(ctx):
                return await single_turn(None, sample, {"temperature": 1.0, "max_new_tokens": LONG})

        out["sample"] = asyncio.run(go())

    accept, held = engine._accept, threading.Event()

    def accept_then_hold(*a, **kw):
        """The scheduler waits, once `after` tokens exist, until the pause below is queued: so the pause
        lands after `after` tokens however fast the rollout thread runs."""
        taken = accept(*a, **kw)
        if engine.generated_tokens >= after and not held.is_set():
            held.set()
            for _ in range(10_000):
                if engine._calls:
                    break
                time.sleep(0.001)
        return taken

    engine._accept = accept_then_hold
    thread = threading.Thread(target=rollout)
    thread.start()
    assert held.wait(60), "the rollout never reached `after` tokens"
    engine.pause_generation(mode)
    engine._accept = accept
    engine.update_weights(named_hf_tensors(new_model), version=1)
    engine.continue_generation()
    thread.join(60)
    assert not thread.is_alive()
    return out["sample"]


def teacher_forced(model, sample, args) -> torch.Tensor:
    """The response log-probs of `sample` under `model`, through the trainer's own forward."""
    trainer = Trainer(args, pm(), model)
    return trainer.compute_log_probs(make_train_batch([sample], args), "old")[0]


def test_partial_rollout_continues_under_new_weights_aligned(engine, bumped, tiny_ckpt):
    ctx = context(engine, partial_rollout=True, min_weight_version=0)
    s = generate_across_update(engine, ctx, bumped, mode="abort")
    assert ctx.stats["continuations"] == 1 and ctx.stats["restarts"] == 0
    assert s.status == Status.TRUNCATED and s.response_length == LONG and len(s.tokens) == len(PROMPT) + LONG
    assert len(s.rollout_log_probs) == len(s.loss_mask) == len(s.response_weight_versions) == LONG
    n = s.response_weight_versions.count(0)
    assert 5 <= n < LONG and s.response_weight_versions == [0] * n + [1] * (LONG - n)
    assert s.weight_versions == [1] and s.oldest_weight_version == 0 and staleness(s, 1) == 1

    # Each log-prob is the one the weights that sampled its token give it: version 0's up to the update,
    # version 1's after it.
    args = make_args(tiny_ckpt, ["--micro-batch-size", "1"])
    old = teacher_forced(load_model(tiny_ckpt), s, args)
    new = teacher_forced(bumped, s, args)
    rollout = torch.tensor(s.rollout_log_probs)
    assert torch.allclose(rollout[:n], old[:n], atol=1e-4)
    assert torch.allclose(rollout[n:], new[n:], atol=1e-4)
    assert (old - new).abs().max() > 1e-2  # the versions are told apart

    # TIS and IcePop, with the trainer at version 1, reweight exactly the tokens version 0 sampled.
    ones = torch.ones(LONG)
    tis = LossTerms(new, new, ones, ones, ones.clone(), [LONG], rollout)
    apply_tis(tis, 0.0, 1e9)
    assert torch.allclose(tis.pg_loss[n:], ones[n:], atol=1e-3)
    assert torch.allclose(tis.pg_loss[:n], torch.exp(new[:n] - old[:n]), atol=1e-3)
    pop = LossTerms(new, new, ones, ones, ones.clone(), [LONG], rollout)
    apply_icepop(pop, 0.999, 1.001)
    assert (pop.pg_loss[n:] != 0).all()


def test_a_partial_response_too_stale_is_regenerated(engine, bumped):
    ctx = context(engine, partial_rollout=True, min_weight_version=1)  # version-0 tokens are too old
    s = generate_across_update(engine, ctx, bumped, mode="abort")
    assert ctx.stats["stale_restarts"] == 1 and ctx.stats["continuations"] == 0
    assert s.response_length == LONG and s.response_weight_versions == [1] * LONG


def test_without_partial_rollout_an_aborted_request_starts_over(engine, bumped):
    ctx = context(engine)
    s = generate_across_update(engine, ctx, bumped, mode="abort")
    assert ctx.stats["restarts"] == 1 and ctx.stats["continuations"] == 0
    assert s.response_length == LONG and s.response_weight_versions == [1] * LONG


def test_an_in_place_pause_labels_tokens_on_both_sides(engine, bumped):
    ctx = context(engine, partial_rollout=True)
    s = generate_across_update(engine, ctx, bumped, mode="in_place")
    n = s.response_weight_versions.count(0)
    assert sum(ctx.stats.values()) == 0 and 5 <= n < LONG
    assert s.response_weight_versions == [0] * n + [1] * (LONG - n)


def test_a_request_past_the_timeout_is_aborted_not_left_waiting(engine):
    engine.pause_generation("in_place")  # nothing decodes: the request would wait forever
    ctx = context(engine, timeout=0.2)
    sample = Sample(tokens=list(PROMPT))

    async def go():
        with rollout_context(ctx):
            return await single_turn(None, sample, {"max_new_tokens": LONG})

    start = time.perf_counter()
    s = asyncio.run(go())
    assert time.perf_counter() - start < 10
    assert s.status == Status.ABORTED and s.response_length == 0 and id(s) in ctx.timed_out
    assert ctx.stats["timeouts"] == 1 and engine.num_waiting == 0  # abort(rid) took it off the queue
    engine.continue_generation()


def test_partial_rollout_over_http_continues_on_the_served_engine(
    tiny_ckpt, tiny_ckpt_b, tmp_path, monkeypatch
):
    """The same continuation through `--rollout-backend http` and a real `miles serve` process: the
    server answers an aborted request with its tokens and their versions, and the continuation runs there
    under the weights pushed over HTTP."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    budget = 150
    local = Engine(load_model(tiny_ckpt).eval(), None, max_batch_size=8)
    eos = local._eos
    seed = next(  # a seed whose version-0 response runs past the update (no end of sequence early)
        s
        for s in range(50)
        if not eos
        & set(local.generate_batch([PROMPT], {"max_new_tokens": 60, "sampling_seed": s})[0].output_ids)
    )
    with (
        served(tiny_ckpt, tmp_path / "serve") as server,
        client_over(tmp_path, tiny_ckpt, (server,)) as client,
    ):
        ctx = RolloutContext(
            engine=client, tokenizer=Tokenizer.from_pretrained(tiny_ckpt), pm=pm(), partial_rollout=True
        )
        sample = Sample(group_index=0, index=0, tokens=list(PROMPT), reward=1.0)
        params = {"temperature": 1.0, "max_new_tokens": budget, "sampling_seed": seed}
        out = {}

        def rollout():
            async def go():
                with rollout_context(ctx):
                    return await single_turn(None, sample, params)

            out["sample"] = asyncio.run(go())

        thread = threading.Thread(target=rollout)
        thread.start()
        wait_for(lambda: server.get("/get_server_info")["generated_tokens"] >= 5, "no tokens were sampled")
        client.pause_generation("abort")
        client.update_weights(named_hf_tensors(load_model(tiny_ckpt_b)), version=1)
        client.continue_generation()
        thread.join(60)
    s = out["sample"]
    n = s.response_weight_versions.count(0)
    assert ctx.stats["continuations"] == 1 and 5 <= n < s.response_length
    assert s.response_weight_versions == [0] * n + [1] * (s.response_length - n)
    assert len(s.rollout_log_probs) == len(s.loss_mask) == s.response_length == len(s.tokens) - len(PROMPT)
    args = make_args(tiny_ckpt, ["--micro-batch-size", "1"])
    old = teacher_forced(load_model(tiny_ckpt), s, args)
    new = teacher_forced(load_model(tiny_ckpt_b), s, args)
    rollout = torch.tensor(s.rollout_log_probs)
    assert torch.allclose(rollout[:n], old[:n], atol=1e-4) and torch.allclose(rollout[n:], new[n:], atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# the loop


def drive(tiny_ckpt, prompts_file, reward_file, tmp_path, extra, n_rollout=4):
    """The loop's own steps over `AsyncRollouts` (a real trainer and engine); every rollout's samples."""
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward_file, n_rollout)[1:]
    args = parse_args([*argv, "--async", *extra], pm())
    check_run_args(args)
    r = build_run(args, pm())
    rollouts = []
    with AsyncRollouts(r.rollouts, r.engine, args, 0, n_rollout) as driver:
        for k in range(n_rollout):
            samples, metrics = driver.take(k)
            rollouts.append((samples, metrics))
            r.trainer.train(k, make_train_batch(samples, args))
            driver.update_weights(r.trainer.named_weights(), version=k + 1)
    return rollouts


@pytest.mark.parametrize(
    "extra",
    [[], ["--update-weights-pause-mode", "abort"], ["--partial-rollout"], ["--max-weight-staleness", "2"]],
)
def test_async_samples_carry_versions_within_the_bound(tiny_ckpt, prompts_file, reward_file, tmp_path, extra):
    bound = int(extra[1]) if extra[:1] == ["--max-weight-staleness"] else 1
    lags = []
    for k, (samples, metrics) in enumerate(drive(tiny_ckpt, prompts_file, reward_file, tmp_path, extra)):
        assert len(samples) == 8
        for s in samples:
            assert len(s.response_weight_versions) == s.response_length == len(s.rollout_log_probs)
            assert all(max(0, k - bound) <= v <= k for v in s.response_weight_versions)
            assert s.weight_versions and s.weight_versions[-1] == max(s.response_weight_versions)
        lag = max(staleness(s, k) for s in samples)
        assert metrics["rollout/max_staleness"] == lag <= bound
        lags.append(lag)
    # Rollout 1 is generated at version 0 while the trainer trains on rollout 0; running further ahead
    # (N = 2) needs training to take longer than generating.
    assert max(lags) >= 1


def run_cli(tiny_ckpt, prompts_file, reward_file, run_dir, extra, n_rollout=3) -> list[dict]:
    argv = base_argv(tiny_ckpt, prompts_file, run_dir, reward_file, n_rollout) + extra
    assert main(argv) == 0
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_async_with_staleness_0_trains_exactly_as_sync(tiny_ckpt, prompts_file, reward_file, tmp_path):
    runs = {}
    for name, extra in (("sync", []), ("async", ["--async", "--max-weight-staleness", "0"])):
        save = ["--save", str(tmp_path / name / "ckpt"), "--save-interval", "1"]
        evals = ["--eval-prompt-data", "toy", str(prompts_file), "--eval-interval", "2"]
        runs[name] = run_cli(tiny_ckpt, prompts_file, reward_file, tmp_path / name, extra + save + evals)
    timing = ("time_s", "tok_per_s", "wait_s", "_time")
    sync, asy = ([{k: v for k, v in x.items() if not k.endswith(timing)} for x in runs[n]] for n in runs)
    assert sync == asy and all(x.get("rollout/max_staleness", 0) == 0 for x in asy)
    weights = [load_file(tmp_path / n / "final_hf" / "model.safetensors") for n in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for step in (1, 2, 3):  # a checkpoint records where the data of the next rollout starts
        states = [
            json.loads((tmp_path / n / "ckpt" / f"iter_{step:07d}" / "loop_state.json").read_text())
            for n in runs
        ]
        assert states[0]["data"] == states[1]["data"] and states[0]["next_rollout"] == step


def test_a_timed_out_sample_is_aborted_and_the_run_goes_on(tiny_ckpt, prompts_file, reward_file, tmp_path):
    # 200 tokens take far longer than 10 ms even on a fast CPU: every request is cut off mid-way.
    extra = ["--rollout-timeout", "0.01", "--rollout-max-response-len", "200"]
    lines = run_cli(tiny_ckpt, prompts_file, reward_file, tmp_path / "run", extra, n_rollout=2)
    rollouts = [x for x in lines if "rollout/aborted_frac" in x]
    assert len(rollouts) == 2 and all(x["rollout/aborted_frac"] > 0 for x in rollouts)
    assert all(x["rollout/timeouts"] >= 1 for x in rollouts)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_sample_staler_than_the_bound_is_not_trained_on(tiny_ckpt, prompts_file, reward_file, tmp_path):
    gen = tmp_path / "gen.py"
    gen.write_text(
        "from miles_core.rollout.generate import single_turn\n\n"
        "async def generate(args, sample, sampling_params):\n"
        "    out = await single_turn(args, sample, sampling_params)\n"
        "    if sample.index == 0:  # as if its first token were cached from the first rollout\n"
        "        out.response_weight_versions[0] = 0\n"
        "    return out\n"
    )
    extra = ["--async", "--custom-generate-function-path", str(gen)]
    lines = run_cli(tiny_ckpt, prompts_file, reward_file, tmp_path / "run", extra, n_rollout=4)
    rollouts = [x for x in lines if "rollout/generate_failed" in x]
    assert [x["rollout/generate_failed"] for x in rollouts] == [0, 0, 1, 1]
    assert all(x["rollout/max_staleness"] <= 1 for x in rollouts)


def test_async_flags_are_checked(tiny_ckpt, prompts_file, reward_file, tmp_path, capsys):
    argv = base_argv(tiny_ckpt, prompts_file, tmp_path / "run", reward_file)
    assert "add --async" in error_of(capsys, [*argv, "--partial-rollout"])
    both = [*argv, "--async", "--partial-rollout", "--update-weights-pause-mode", "in_place"]
    assert "drop one of them" in error_of(capsys, both)
    assert "0 or more" in error_of(capsys, [*argv, "--async", "--max-weight-staleness", "-1"])
    assert "positive number of seconds" in error_of(capsys, [*argv, "--rollout-timeout", "0"])
    config = tmp_path / "run.yaml"
    config.write_text("async: true\npartial-rollout: true\n")
    args = parse_args([*argv[1:], "--config", str(config)], pm())
    assert args.async_rollout and args.update_weights_pause_mode == "abort"


@pytest.mark.slow
def test_demo_learns_in_async_mode(tmp_path):
    """The demo's first 50 rollouts with --async lift held-out accuracy as the sync demo does."""
    run = tmp_path / "demo"
    argv = ["train", "--config", str(REPO / "examples" / "demo.yaml"), "--async", "--run-dir", str(run)]
    argv += ["--num-rollout", "50", "--eval-interval", "50", "--save-interval", "1000"]
    argv += ["--hf-checkpoint", str(REPO / "examples" / "arith" / "checkpoint")]
    argv += ["--prompt-data", str(REPO / "examples" / "arith" / "data" / "train.jsonl")]
    argv += ["--eval-prompt-data", "arith", str(REPO / "examples" / "arith" / "data" / "test.jsonl")]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.15
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(x.get("rollout/max_staleness", 0) for x in lines) == 1
