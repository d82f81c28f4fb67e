"""FSDP2 trainer ranks (gloo, real processes on CPU): a 2-rank step equals the 1-rank and the
single-process step, sharded checkpoints resume on another rank count, samples balance by tokens.

Each world of ranks is spawned once and runs several scenarios (`fsdp_worlds`: the shared bodies and
helpers; `test_multigpu` runs the same bodies on CUDA ranks). Worlds: ``two`` (2 ranks: both layouts, a
checkpoint after step 1 and step 2, the averaging bug, a too-small step, --bf16), ``one`` (1 rank: both
layouts and its own checkpoint; resumes ``two``'s), ``two_resumed`` (2 ranks: resumes ``one``'s).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from fsdp_worlds import (
    COMMON,
    FLAGS,
    LAYOUTS,
    PROMPT_LEN,
    REL,
    RESPONSES,
    assert_same_step,
    checkpoint_dir,
    make_args,
    make_batch,
    resumed_world,
    spawn,
    steps_world,
)

from miles_core.model import load_model, named_hf_tensors
from miles_core.plugins import get_plugin_manager
from miles_core.train.packing import balance_by_tokens, pack_by_tokens
from miles_core.train.trainer import Trainer
from miles_core.types import UsageError

# -------------------------------------------------------------------------------- rank processes


def _world_two(ctx: dict, build) -> dict:
    from torch.distributed.fsdp import FSDPModule

    res = steps_world(ctx, build)
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
    return {**steps_world(ctx, build), **resumed_world({**ctx, "resume": "two"}, build)}


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


# On CPU: fp32 ranks, both layouts; the padded one checkpoints after step 1.
CPU_CTX = {"device": "cpu", "layouts": list(LAYOUTS), "checkpointed": ["padded"]}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def worlds(out_dir, tiny_ckpt, tiny_ckpt_b) -> dict[str, list[dict]]:
    ctx = {**CPU_CTX, "out": out_dir, "ref": tiny_ckpt, "policy": tiny_ckpt_b}
    # In order: each resumes the checkpoint of the one before.
    return {
        "two": spawn("two", _world_two, 2, ctx),
        "one": spawn("one", _world_one, 1, ctx),
        "two_resumed": spawn("two_resumed", resumed_world, 2, {**ctx, "resume": "one"}),
    }


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
    saved = list(named_hf_tensors(load_model(checkpoint_dir({"out": out_dir}, "two", "padded") / "model")))
    step1 = worlds["two"][0]["padded"]["weights"]
    assert [n for n, _ in saved] == [n for n, _ in step1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(saved, step1))


def test_checkpoint_of_two_ranks_resumes_on_one(worlds):
    assert_same_step(worlds["one"][0]["resumed_step2"]["padded"], worlds["two"][0]["step2"]["padded"])


def test_checkpoint_of_one_rank_resumes_on_two(worlds):
    for rank in (0, 1):
        got = worlds["two_resumed"][rank]["resumed_step2"]["padded"]
        assert_same_step(got, worlds["one"][0]["step2"]["padded"])


def test_a_step_with_fewer_samples_than_ranks_is_refused(worlds):
    assert "1 samples for 2 trainer ranks" in worlds["two"][0]["too_small"]
    assert "--global-batch-size" in worlds["two"][1]["too_small"]


def test_state_problem_names_the_damaged_file(worlds, out_dir, tmp_path):
    from miles_core.distributed.trainer import OPTIMIZER_DIR, STATE_FILE, state_problem

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir({"out": out_dir}, "two", "padded"), ckpt)
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
    (res,) = spawn("gpu", _world_gpu, 1, ctx)
    args = make_args(tiny_ckpt, [*COMMON, *FLAGS["bf16"]])
    ref = load_model(tiny_ckpt, device="cuda").eval().requires_grad_(False)
    pm = get_plugin_manager(env={"MILES_LOAD_PLUGINS": ""})
    expected = Trainer(args, pm, load_model(tiny_ckpt_b, device="cuda"), ref).train(0, make_batch(args, 1))[0]
    for k in ("pg_loss", "entropy", "grad_norm"):
        assert res["first"][k] == pytest.approx(expected[k], rel=2e-2, abs=1e-3), k
    assert res["offloaded"] and res["restored"] and math.isfinite(res["second"]["grad_norm"])
    assert res["saved"]  # the checkpoint written while offloaded holds the real AdamW state
