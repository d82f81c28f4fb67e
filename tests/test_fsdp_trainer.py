"""FSDP2 trainer ranks (gloo, real processes on CPU): a 2-rank step equals the 1-rank and the
single-process step, sharded checkpoints resume on another rank count, samples balance by tokens.

Each world of ranks is spawned once and runs several scenarios (`_rank_main`); rank results come back
as ``torch.save`` files and the tests compare them. Worlds: ``two`` (2 ranks: both layouts, a
checkpoint after step 1 and step 2, the averaging bug, a too-small step), ``one`` (1 rank: both
layouts; resumes ``two``'s checkpoint; writes its own), ``two_resumed`` (2 ranks: resumes ``one``'s).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from miles_core.args import check_run_args, parse_args
from miles_core.loop import make_train_batch
from miles_core.model import load_model, named_hf_tensors
from miles_core.plugins import get_plugin_manager
from miles_core.train.packing import balance_by_tokens, pack_by_tokens
from miles_core.train.trainer import Trainer
from miles_core.types import Sample, Status, UsageError

# Both layouts give the ranks different micro-batch counts on batch 1's lengths (checked below); the
# packed one also recomputes each layer's MoE block in backward (--recompute-activations). The KL term
# (policy from tiny_ckpt_b, reference tiny_ckpt) exercises the sharded reference model. A larger AdamW
# eps keeps the updated weights a well-conditioned function of the gradient: with 1e-8, a first step
# moves each weight by ~lr * sign(grad), and an expert's near-zero gradient (a sum that cancels) flips
# sign with the summation order.
COMMON = ["--use-kl-loss", "--kl-loss-coef", "0.1", "--entropy-coef", "0.01", "--adam-eps", "1e-4"]
LAYOUTS = {
    "padded": ["--micro-batch-size", "2", "--calculate-per-token-loss"],
    "dynamic": ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "16", "--recompute-activations"],
}
# --bf16: bf16 compute (FSDP's MixedPrecisionPolicy), the fp32 shards are the masters.
FLAGS = {**LAYOUTS, "bf16": ["--micro-batch-size", "2", "--calculate-per-token-loss", "--bf16"]}
RESPONSES = {1: [30, 2, 3, 2, 4, 3, 2, 5], 2: [3, 9, 2, 6, 2, 11, 4, 3]}  # batch seed -> lengths
PROMPT_LEN = 4
REL = 1e-5


def make_args(ref_ckpt: Path, extra: list[str]):
    argv = [
        "--hf-checkpoint", str(ref_ckpt), "--prompt-data", "x.jsonl", "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "4", "--num-rollout", "2", "--rm-type", "math", "--lr", "1e-3", *extra,
    ]  # fmt: skip
    args = parse_args(argv, get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""}))
    check_run_args(args)
    return args


def make_batch(args, seed: int, record_routes: bool = False):
    """Two groups of four samples with the response lengths of ``RESPONSES[seed]``."""
    rng = random.Random(seed)
    samples = []
    for i, r in enumerate(RESPONSES[seed]):
        tokens = [rng.randrange(5, 200) for _ in range(PROMPT_LEN + r)]
        samples.append(
            Sample(
                group_index=i // 4,
                index=i,
                tokens=tokens,
                response_length=r,
                rollout_log_probs=[-4.0 - 0.1 * j for j in range(r)],
                loss_mask=[1] * r,
                reward=float((i + seed) % 2 + (i == 3)),
                status=Status.COMPLETED,
                sampling_params={"temperature": 0.9},
            )  # fmt: skip
        )
    batch = make_train_batch(samples, args)
    batch.record_routes = record_routes
    return batch


# -------------------------------------------------------------------------------- rank processes


def _weights(trainer, bucket_bytes: int = 64 * 2**10) -> tuple[list, list[tuple[int, int]]]:
    buckets = list(trainer.full_weights(bucket_bytes))
    flat = [(n, t.clone()) for b in buckets for n, t in b]
    return flat, [(sum(t.numel() * t.element_size() for _, t in b), len(b)) for b in buckets]


def _step(trainer, args, seed: int, record_routes: bool = False) -> dict:
    batch = make_batch(args, seed, record_routes)
    metrics = trainer.train(seed - 1, batch)[0]
    weights, bucket_sizes = _weights(trainer)
    fused = [(n, t.clone()) for b in trainer.full_weights(64 * 2**10, fused_experts=True) for n, t in b]
    out = {"metrics": metrics, "weights": weights, "buckets": bucket_sizes, "fused": fused}
    if record_routes:
        out["routes"] = batch.recorded_routes
    return out


def _world_two(ctx: dict, build) -> dict:
    from torch.distributed.fsdp import FSDPModule

    res: dict = {}
    for layout in LAYOUTS:
        trainer, args = build(layout)
        res[layout] = _step(trainer, args, 1, record_routes=layout == "padded")
        if layout == "padded":  # checkpoint after step 1, then step 2 uninterrupted
            ckpt = ctx["out"] / "ckpt_two"
            trainer.save_model(ckpt / "model", str(ctx["ref"]))
            trainer.save_state(ckpt)
            trainer.offload()
            trainer.onload()
            res["step2"] = _step(trainer, args, 2)
    # The bug the gradient-sum scale guards against: FSDP's default averaging over the 2 ranks.
    trainer, args = build("padded")
    for m in trainer.model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(2.0)
    res["averaged"] = trainer.train(0, make_batch(args, 1))[0]
    one = make_batch(args, 1)
    try:
        trainer.train(0, one.subset([0]))
    except UsageError as err:
        res["too_small"] = str(err)
    # --bf16: the HF model/ holds bf16 weights, the state the fp32 masters, which a resume restores.
    trainer, args = build("bf16")
    res["bf16"] = {"metrics": trainer.train(0, make_batch(args, 1))[0]}
    ckpt = ctx["out"] / "ckpt_bf16"
    trainer.save_model(ckpt / "model", str(ctx["ref"]))
    trainer.save_state(ckpt)
    resumed, _ = build("bf16", ckpt)
    pairs = zip(trainer.model.parameters(), resumed.model.parameters(), strict=True)
    res["bf16"]["masters_restored"] = all(
        p.dtype == torch.float32 and torch.equal(p.full_tensor(), q.full_tensor()) for p, q in pairs
    )
    return res


def _world_one(ctx: dict, build) -> dict:
    res: dict = {}
    for layout in LAYOUTS:
        trainer, args = build(layout)
        res[layout] = _step(trainer, args, 1, record_routes=layout == "padded")
        if layout == "padded":
            ckpt = ctx["out"] / "ckpt_one"
            trainer.save_model(ckpt / "model", str(ctx["ref"]))
            trainer.save_state(ckpt)
            res["step2"] = _step(trainer, args, 2)
    trainer, args = build("padded", ctx["out"] / "ckpt_two")
    res["resumed_step2"] = _step(trainer, args, 2)
    return res


def _world_two_resumed(ctx: dict, build) -> dict:
    trainer, args = build("padded", ctx["out"] / "ckpt_one")
    return {"resumed_step2": _step(trainer, args, 2)}


def _adam_tensors(trainer) -> list[torch.Tensor]:
    return [t for st in trainer.optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]


def _world_gpu(ctx: dict, build) -> dict:
    """One rank on CUDA (NCCL) with --bf16: a step, offload, a checkpoint while offloaded, onload (its
    copies in flight until the step), another step."""
    trainer, args = build("bf16")
    first = trainer.train(0, make_batch(args, 1))[0]
    states = _adam_tensors(trainer)
    values = [t.full_tensor().clone() if t.is_cuda and t.dim() else None for t in states]
    before = torch.cuda.memory_allocated()
    trainer.offload()  # parked in place: the device memory of the AdamW state is given back
    offloaded = torch.cuda.memory_allocated() < before and all(
        t.to_local().untyped_storage().nbytes() == 0 for t in states if t.is_cuda and t.dim()
    )
    ckpt = ctx["out"] / "ckpt_gpu"
    trainer.save_model(ckpt / "model", str(ctx["ref"]))
    trainer.save_state(ckpt)  # reads the parked state back for the write, and parks it again
    still_offloaded = all(
        t.to_local().untyped_storage().nbytes() == 0 for t in states if t.is_cuda and t.dim()
    )
    trainer.onload()
    trainer._parking.ready()
    restored = all(v is None or torch.equal(t.full_tensor(), v) for t, v in zip(states, values))
    second = trainer.train(1, make_batch(args, 2))[0]
    resumed, _ = build("bf16", ckpt)
    loaded = _adam_tensors(resumed)
    saved = len(loaded) == len(values) and all(
        v is None or torch.equal(t.full_tensor(), v) for t, v in zip(loaded, values)
    )
    return {"first": first, "second": second, "offloaded": offloaded and still_offloaded,
            "restored": restored, "saved": saved}  # fmt: skip


WORLDS = {
    "two": (2, _world_two),
    "one": (1, _world_one),
    "two_resumed": (2, _world_two_resumed),
    "gpu": (1, _world_gpu),
}


def _rank_main(rank: int, world: str, port: int, ctx: dict) -> None:
    torch.set_num_threads(1)
    from miles_core.distributed.trainer import build_rank_trainer, close_rank, init_rank

    size, body = WORLDS[world]
    try:
        device = init_rank(rank, size, "127.0.0.1", port, ctx.get("device", "cpu"), timeout_s=60)
        pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})

        def build(layout: str, resume: Path | None = None):
            args = make_args(ctx["ref"], [*COMMON, *FLAGS[layout]])
            trainer = build_rank_trainer(args, pm, str(resume / "model" if resume else ctx["policy"]), device)
            if resume:
                trainer.load_state(resume)
            return trainer, args

        torch.save(body(ctx, build), ctx["out"] / f"{world}_{rank}.pt")
        close_rank()
    except BaseException:
        (ctx["out"] / f"{world}_{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: str, ctx: dict) -> list[dict]:
    size = WORLDS[world][0]
    procs = mp.start_processes(
        _rank_main, args=(world, _free_port(), ctx), nprocs=size, join=False, start_method="spawn"
    )
    try:
        for p in procs.processes:
            p.join(180)
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [(ctx["out"] / f"{world}_{r}.err") for r in range(size)]
    for r, (p, err) in enumerate(zip(procs.processes, errors)):
        assert p.exitcode == 0, f"{world} rank {r} exited {p.exitcode}:\n" + (
            err.read_text() if err.exists() else ""
        )
    return [torch.load(ctx["out"] / f"{world}_{r}.pt") for r in range(size)]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def worlds(out_dir, tiny_ckpt, tiny_ckpt_b) -> dict[str, list[dict]]:
    ctx = {"out": out_dir, "ref": tiny_ckpt, "policy": tiny_ckpt_b}
    # In order: each resumes the checkpoint of the one before.
    return {world: _spawn(world, ctx) for world in ("two", "one", "two_resumed")}


@pytest.fixture(scope="module")
def plain(tiny_ckpt, tiny_ckpt_b) -> dict[str, dict]:
    """The single-process `Trainer`'s first step on the same batch, per layout."""
    res = {}
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    for layout, flags in LAYOUTS.items():
        args = make_args(tiny_ckpt, [*COMMON, *flags])
        ref = load_model(tiny_ckpt).eval().requires_grad_(False)
        trainer = Trainer(args, pm, load_model(tiny_ckpt_b), ref)
        batch = make_batch(args, 1, record_routes=layout == "padded")
        metrics = trainer.train(0, batch)[0]
        weights = [(n, t.clone()) for n, t in named_hf_tensors(trainer.model)]
        res[layout] = {"metrics": metrics, "weights": weights, "routes": batch.recorded_routes}
    return res


def assert_same_step(a: dict, b: dict) -> None:
    """Same metrics (fp32 summation order aside) and the same updated weights, names in order."""
    assert a["metrics"].keys() == b["metrics"].keys()
    for k, v in a["metrics"].items():
        assert v == pytest.approx(b["metrics"][k], rel=REL, abs=1e-7), k
    assert [n for n, _ in a["weights"]] == [n for n, _ in b["weights"]]
    for (name, x), (_, y) in zip(a["weights"], b["weights"]):
        torch.testing.assert_close(x, y, rtol=REL, atol=1e-6, msg=name)


# -------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ranks_get_different_micro_batch_counts(tiny_ckpt, layout):
    """The premise of the step test: the ranks' shares need different numbers of micro-batches, so
    the equal-count fillers are exercised."""
    args = make_args(tiny_ckpt, [*COMMON, *LAYOUTS[layout]])
    lengths = [PROMPT_LEN + r for r in RESPONSES[1]]
    counts = [
        len(pack_by_tokens([lengths[i] - 1 for i in share], 16))
        if args.use_dynamic_batch_size
        else math.ceil(len(share) / args.micro_batch_size)
        for share in balance_by_tokens(lengths, 2)
    ]
    assert counts[0] != counts[1]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_rank_step_equals_one_rank_and_single_process_step(worlds, plain, layout):
    two, one = worlds["two"], worlds["one"]
    assert two[0][layout]["metrics"] == two[1][layout]["metrics"]  # every rank reports the same
    assert abs(plain[layout]["metrics"]["kl_loss"]) > 1e-3 and plain[layout]["metrics"]["grad_norm"] > 1.0
    assert_same_step(two[0][layout], plain[layout])
    assert_same_step(one[0][layout], plain[layout])
    assert_same_step(two[1][layout], one[0][layout])
    if layout == "padded":  # R3's recorded routes, all-gathered
        for got in (two[0][layout]["routes"], two[1][layout]["routes"]):
            assert all(torch.equal(a, b) for a, b in zip(got, plain[layout]["routes"], strict=True))


def test_bf16_step_matches_master_adamw_and_resumes_the_fp32_masters(worlds, tiny_ckpt, tiny_ckpt_b, out_dir):
    args = make_args(tiny_ckpt, [*COMMON, *FLAGS["bf16"]])
    ref = load_model(tiny_ckpt).eval().requires_grad_(False)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    expected = Trainer(args, pm, load_model(tiny_ckpt_b), ref).train(0, make_batch(args, 1))[0]
    got = worlds["two"][0]["bf16"]
    for k in ("pg_loss", "entropy", "kl_loss", "grad_norm"):
        assert got["metrics"][k] == pytest.approx(expected[k], rel=2e-3, abs=1e-6), k
    assert got["masters_restored"]
    assert (
        json.loads((out_dir / "ckpt_bf16" / "model" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    )


def test_gradients_are_summed_over_ranks_not_averaged(worlds, plain):
    """With FSDP's default averaging left in, the gradient (and its norm) would be halved: the match
    above catches it, as this run with averaging switched back on shows."""
    averaged = worlds["two"][0]["averaged"]["grad_norm"]
    assert averaged == pytest.approx(plain["padded"]["metrics"]["grad_norm"] / 2, rel=REL)


def test_full_weights_come_in_buckets(worlds):
    buckets = worlds["two"][0]["padded"]["buckets"]
    assert len(buckets) > 1
    assert all(size <= 64 * 2**10 or count == 1 for size, count in buckets)  # one tensor may be larger


def test_fused_expert_weights_split_into_the_per_expert_ones(worlds):
    """The colocated hand-over sends each layer's experts as two 3-D tensors; split by HF names they are
    the per-expert tensors, value for value."""
    from miles_core.model.hf_io import hf_tensors_of_state

    got = worlds["two"][0]["padded"]
    fused = got["fused"]
    assert any(n.endswith(".experts.gate_up_proj") and t.dim() == 3 for n, t in fused)
    assert len(fused) < len(got["weights"])
    split = list(hf_tensors_of_state(fused, tied=False))
    assert [n for n, _ in split] == [n for n, _ in got["weights"]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(split, got["weights"]))


def test_save_model_writes_the_full_policy(worlds, out_dir):
    saved = list(named_hf_tensors(load_model(out_dir / "ckpt_two" / "model")))
    step1 = worlds["two"][0]["padded"]["weights"]
    assert [n for n, _ in saved] == [n for n, _ in step1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(saved, step1))


def test_checkpoint_of_two_ranks_resumes_on_one(worlds):
    assert_same_step(worlds["one"][0]["resumed_step2"], worlds["two"][0]["step2"])


def test_checkpoint_of_one_rank_resumes_on_two(worlds):
    for rank in (0, 1):
        assert_same_step(worlds["two_resumed"][rank]["resumed_step2"], worlds["one"][0]["step2"])


def test_a_step_with_fewer_samples_than_ranks_is_refused(worlds):
    assert "1 samples for 2 trainer ranks" in worlds["two"][0]["too_small"]
    assert "--global-batch-size" in worlds["two"][1]["too_small"]


def test_state_problem_names_the_damaged_file(worlds, out_dir, tmp_path):
    from miles_core.distributed.trainer import OPTIMIZER_DIR, STATE_FILE, state_problem

    ckpt = tmp_path / "ckpt"
    shutil.copytree(out_dir / "ckpt_two", ckpt)
    assert state_problem(ckpt) is None
    shard = sorted((ckpt / OPTIMIZER_DIR).glob("*.distcp"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    truncated = f"{OPTIMIZER_DIR}/{shard.name} is truncated ({len(data) // 2} of at least "
    assert state_problem(ckpt).startswith(truncated)
    shard.unlink()
    assert state_problem(ckpt) == f"{OPTIMIZER_DIR}/{shard.name} is missing"
    (ckpt / OPTIMIZER_DIR / ".metadata").write_bytes(b"garbage")
    assert state_problem(ckpt).startswith(f"{OPTIMIZER_DIR}/.metadata is truncated or corrupt")
    (ckpt / STATE_FILE).write_text("{")
    assert state_problem(ckpt) == f"{STATE_FILE} is truncated or corrupt (not valid JSON)"
    (ckpt / STATE_FILE).unlink()
    assert state_problem(ckpt) == f"{STATE_FILE} is missing"


def test_balance_by_tokens_is_deterministic_non_empty_and_even():
    rng = random.Random(3)
    for _ in range(50):
        world = rng.randint(1, 8)
        lengths = [rng.randint(1, 500) for _ in range(rng.randint(world, 40))]
        shares = balance_by_tokens(lengths, world)
        assert shares == balance_by_tokens(list(lengths), world)
        assert sorted(i for s in shares for i in s) == list(range(len(lengths)))
        assert all(s and s == sorted(s) for s in shares)
        loads = [sum(lengths[i] for i in s) for s in shares]
        # Longest-first greedy: no rank exceeds another by more than its longest sample.
        assert max(loads) - min(loads) <= max(lengths)
    assert balance_by_tokens([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert balance_by_tokens([10, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert balance_by_tokens([0, 0, 0], 3) == [[0], [1], [2]]  # non-empty even without tokens


def test_balance_by_tokens_refuses_fewer_samples_than_ranks():
    with pytest.raises(UsageError, match="3 samples for 4 trainer ranks"):
        balance_by_tokens([4, 5, 6], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_cuda_rank_bf16_steps_and_offloads(tmp_path, tiny_ckpt, tiny_ckpt_b):
    ctx = {"out": tmp_path, "ref": tiny_ckpt, "policy": tiny_ckpt_b, "device": "cuda"}
    (res,) = _spawn("gpu", ctx)
    args = make_args(tiny_ckpt, [*COMMON, *FLAGS["bf16"]])
    ref = load_model(tiny_ckpt, device="cuda").eval().requires_grad_(False)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    expected = Trainer(args, pm, load_model(tiny_ckpt_b, device="cuda"), ref).train(0, make_batch(args, 1))[0]
    for k in ("pg_loss", "entropy", "grad_norm"):
        assert res["first"][k] == pytest.approx(expected[k], rel=2e-2, abs=1e-3), k
    assert res["offloaded"] and res["restored"] and math.isfinite(res["second"]["grad_norm"])
    assert res["saved"]  # the checkpoint written while offloaded holds the real AdamW state
