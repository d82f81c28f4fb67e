"""The scaled-out guarantees on several GPUs (`pytest -m multigpu`; each test skips where fewer CUDA devices
are visible than it needs): the bodies of `test_fsdp_trainer` (`fsdp_worlds`) and of `test_scaled_out`'s
engine restart (`scaled_out_helpers`), on CUDA ranks that talk NCCL, one GPU a process. The rank-count
checks also run on CPU ranks over gloo (slow-marked: ``pytest -m slow tests/test_multigpu.py``).

- one GRPO step (same seed, same batch) on 1, 2 and (with 4 GPUs) 4 trainer ranks: the same metrics and
  the same updated weights, fp32 (padded and packed micro-batches) and --bf16;
- a `torch.distributed.checkpoint` written by 2 ranks after step 1 resumes on 1 and (with 4 GPUs) 4
  ranks, and step 2 equals the uninterrupted 2-rank run's, fp32 and --bf16 (fp32 masters);
- an engine actor SIGKILLed mid-run is restarted by Ray and caught up to the trainer's weights
  (`rollout/engine_restarts`): 1 trainer rank + 1 engine on 2 GPUs, + 2 engines on 3.

Rank r of a world uses the r-th visible GPU; the Ray runs get CUDA_VISIBLE_DEVICES cut to the GPUs of
their layout, and check that Ray bound 127.0.0.1 and counted exactly those. NCCL's settings (NVLink
multicast, NCCL_NVLS_ENABLE) pass through as the machine sets them: nothing here changes them.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from fsdp_worlds import LR, assert_same_step, resumed_world, spawn, steps_world
from scaled_out_helpers import run_with_an_engine_killed

# The world fixture spawns several worlds in the first tests (on CUDA, Triton compiles on first use).
pytestmark = pytest.mark.timeout(1800)

LAYOUTS = ["padded", "dynamic", "bf16"]
CHECKPOINTED = ["padded", "bf16"]


def cases(*ranks: int) -> list:
    """``(device, ranks)`` for each rank count: on CPU (gloo processes, slow), and on CUDA where at least
    ``max(2, ranks)`` GPUs are visible (a single rank is compared with, or resumes, 2 ranks' results)."""
    out = [pytest.param("cpu", n, marks=pytest.mark.slow, id=f"cpu-{n}") for n in ranks]
    marks = [pytest.mark.multigpu(gpus=max(2, n)) for n in ranks]
    return out + [pytest.param("cuda", n, marks=m, id=f"cuda-{n}") for n, m in zip(ranks, marks)]


# How far the same step may differ between rank counts. What differs is the order of sums: each rank
# reduces over its share of the tokens, and FSDP sums the ranks' gradients in a reduce-scatter.
# - fp32: a few fp32 roundings of the sums (~1e-7 relative), 1e-4 leaves room for cuBLAS picking other
#   kernels for other micro-batch shapes. The first AdamW step moves a weight by lr * g / (|g| + eps):
#   its derivative in g is at most lr / eps = 10, so a 1e-7 gradient difference moves it by 1e-6 at most;
#   atol 1e-5 is well under what the bugs give (a lost or doubled step: ~lr = 1e-3; FSDP's averaging
#   over 2 ranks: grad_norm halved, and 1.7e-4 on the weights with |g| near eps).
# - bf16: each rank's gradient of its share is rounded to bf16 (2^-8 relative) before the fp32
#   reduce-scatter, and bf16 activations can differ by an ulp between micro-batch shapes: the metrics to
#   2e-2 (the bar of the 1-GPU bf16 test in test_fsdp_trainer). The weights are the fp32 masters cast to
#   bf16: masters that differ a little round to bf16 values one ulp (at most 2^-7 relative) apart; where a
#   gradient cancels between the ranks (|g| near eps) the masters differ by a fraction of lr, so atol is
#   lr / 2, still under a lost, doubled or sign-flipped step (>= lr wherever |g| > eps).
TOLERANCE = {
    "padded": {"rel": 1e-4, "abs_metric": 1e-6, "atol": 1e-5},
    "dynamic": {"rel": 1e-4, "abs_metric": 1e-6, "atol": 1e-5},
    "bf16": {"rel": 2e-2, "abs_metric": 1e-3, "rtol": 2**-7, "atol": LR / 2},
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, tiny_ckpt, tiny_ckpt_b):
    """``world(device, ranks)``: `steps_world` on that many ranks; ``world(device, ranks, resume_from=2)``:
    `resumed_world` from the checkpoints of ``world(device, 2)``. Each is spawned once, when first asked
    for."""
    out = tmp_path_factory.mktemp("ranks")
    base = {
        "layouts": LAYOUTS,
        "checkpointed": CHECKPOINTED,
        "out": out,
        "ref": tiny_ckpt,
        "policy": tiny_ckpt_b,
    }
    done: dict[str, list[dict]] = {}

    def world(device: str, ranks: int, resume_from: int | None = None) -> list[dict]:
        name = (
            f"{device}_steps{ranks}" if resume_from is None else f"{device}_resumed{ranks}_from{resume_from}"
        )
        ctx = {**base, "device": device}
        if name not in done:
            if resume_from is None:
                done[name] = spawn(name, steps_world, ranks, ctx, timeout=900)
            else:
                world(device, resume_from)  # its checkpoints first
                resume = {**ctx, "resume": f"{device}_steps{resume_from}"}
                done[name] = spawn(name, resumed_world, ranks, resume, timeout=900)
        return done[name]

    return world


@pytest.mark.parametrize("device,ranks", cases(2, 4))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_is_the_same_on_any_number_of_ranks(worlds, layout, device, ranks):
    one = worlds(device, 1)[0][layout]
    many = worlds(device, ranks)
    assert len(many) == ranks
    assert abs(one["metrics"]["kl_loss"]) > 1e-3 and one["metrics"]["grad_norm"] > 1.0  # a real step
    for rank, got in enumerate(many):
        assert got[layout]["metrics"] == many[0][layout]["metrics"], rank  # every rank reports the same
        assert_same_step(got[layout], one, **TOLERANCE[layout])


@pytest.mark.parametrize("device,ranks", cases(1, 4))
@pytest.mark.parametrize("layout", CHECKPOINTED)
def test_checkpoint_of_two_ranks_resumes_on_another_count(worlds, layout, device, ranks):
    uninterrupted = worlds(device, 2)[0]["step2"][layout]
    assert uninterrupted["metrics"]["grad_norm"] > 0
    resumed = worlds(device, ranks, resume_from=2)
    assert len(resumed) == ranks
    for got in resumed:
        assert_same_step(got["resumed_step2"][layout], uninterrupted, **TOLERANCE[layout])


def visible_gpus() -> list[str]:
    """This process's CUDA devices as CUDA_VISIBLE_DEVICES names them (indices where it is unset)."""
    count = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(count)]
    return [x.strip() for x in env.split(",") if x.strip()][:count]


@pytest.mark.parametrize(
    "engines",
    [
        pytest.param(1, marks=pytest.mark.multigpu(gpus=2)),
        pytest.param(2, marks=pytest.mark.multigpu(gpus=3)),
    ],
)
def test_engine_actor_killed_on_a_gpu_is_restarted_and_caught_up(
    tiny_ckpt, prompts_file, reward_file, tmp_path, engines
):
    pytest.importorskip("ray")
    gpus = visible_gpus()[: 1 + engines]  # the trainer rank's and one an engine
    env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    _, text = run_with_an_engine_killed(
        tmp_path, tiny_ckpt, prompts_file, reward_file, engines=engines, device="cuda", env=env, timeout=600
    )
    # Ray listened on loopback only and counted the GPUs it was shown, no others: one a process.
    found = re.search(r"started a local Ray cluster on 127\.0\.0\.1: \S+ CPU, (\S+) GPU", text)
    assert found and found.group(1) == str(len(gpus)), text[-3000:]
    engines_text = f"{engines} rollout engine{'s' * (engines != 1)}"
    assert f"1 trainer rank + {engines_text}, disaggregated, on {len(gpus)} GPUs" in text
