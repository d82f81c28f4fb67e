"""The layout of a scaled-out run from slime's cluster flags (no Ray process is started): counts and
bundles of each layout, the picture `describe` draws, each inconsistency refused in one sentence, and the
missing ``ray`` extra named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from miles_core.args import build_parser
from miles_core.distributed import placement
from miles_core.distributed.placement import Layout
from miles_core.errors import UsageError


def layout(*flags: str) -> Layout:
    # The parser alone: `validate` still refuses these layouts on the single-process path.
    return Layout.from_args(build_parser().parse_args(["--device", "cpu", *flags]))


@pytest.mark.parametrize(
    "flags, ranks, engines, per_engine, bundles",
    [
        ([], 1, 1, 1, 2),
        (["--actor-num-gpus-per-node", "2", "--rollout-num-engines", "2"], 2, 2, 1, 4),
        (
            ["--actor-num-nodes", "2", "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "4"],
            8,
            4,
            1,
            12,
        ),
        (["--rollout-num-gpus", "4", "--rollout-num-gpus-per-engine", "2"], 1, 2, 2, 5),
        (["--actor-num-gpus-per-node", "4", "--colocate"], 4, 4, 1, 4),
        (["--actor-num-gpus-per-node", "4", "--colocate", "--rollout-num-gpus-per-engine", "2"], 4, 2, 2, 4),
        (["--actor-num-gpus-per-node", "2", "--colocate", "--rollout-num-gpus", "2"], 2, 2, 1, 2),
        (
            ["--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "2", "--rollout-num-engines", "2"],
            2,
            2,
            1,
            4,
        ),
    ],
)
def test_layout_counts(flags, ranks, engines, per_engine, bundles):
    lay = layout(*flags)
    assert (lay.trainer_ranks, lay.num_engines, lay.gpus_per_engine, lay.num_bundles) == (
        ranks,
        engines,
        per_engine,
        bundles,
    )
    assert lay.num_processes == ranks + engines


def test_bundles_of_trainer_ranks_and_engines():
    disagg = layout(
        "--actor-num-gpus-per-node", "2", "--rollout-num-gpus", "4", "--rollout-num-gpus-per-engine", "2"
    )
    assert [disagg.trainer_bundle(r) for r in range(2)] == [0, 1]
    assert [disagg.engine_bundles(j) for j in range(2)] == [[2, 3], [4, 5]]
    coloc = layout("--actor-num-gpus-per-node", "4", "--colocate", "--rollout-num-gpus-per-engine", "2")
    assert [coloc.engine_bundles(j) for j in range(2)] == [[0, 1], [2, 3]]  # the trainer ranks' devices
    with pytest.raises(IndexError):
        coloc.engine_bundles(2)
    with pytest.raises(IndexError):
        coloc.trainer_bundle(4)


def test_resources_of_bundles_and_actors():
    cpu = layout()
    assert cpu.device == "cpu" and cpu.bundle() == {"CPU": 1}
    assert cpu.trainer_resources() == cpu.engine_resources() == {"num_gpus": 0, "num_cpus": 1.0}
    gpu = Layout.from_args(build_parser().parse_args(["--device", "cuda:0", "--colocate"]))
    assert gpu.device == "cuda" and gpu.bundle() == {"GPU": 1, "CPU": 1}
    # Colocated: both fit on one bundle (slime's shares).
    assert gpu.trainer_resources() == {"num_gpus": 0.4, "num_cpus": 0.4}
    assert gpu.engine_resources() == {"num_gpus": 0.2, "num_cpus": 0.2}


def test_describe_draws_where_each_process_runs():
    text = layout("--actor-num-gpus-per-node", "2", "--rollout-num-engines", "2").describe()
    assert text.splitlines() == [
        "2 trainer ranks + 2 rollout engines, disaggregated, on 4 CPUs in one Ray placement group "
        "(on CPU each GPU of the flags is a process with one CPU)",
        "  CPU 0-1     trainer ranks 0-1 (1 node x 2 CPUs, torch.distributed over gloo)",
        "  CPU 2-3     rollout engines 0-1 (1 CPU each, `miles serve` over HTTP)",
    ]
    args = build_parser().parse_args(["--device", "cuda", "--actor-num-gpus-per-node", "4", "--colocate"])
    text = Layout.from_args(args).describe()
    assert "colocated, on 4 GPUs" in text and "GPU 0-3" in text and "take turns" in text
    assert "0.4 of each GPU" in text and "0.2 of each GPU" in text


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--rollout-num-gpus", "3", "--rollout-num-gpus-per-engine", "2"],
            "--rollout-num-gpus 3 is not divisible by --rollout-num-gpus-per-engine 2; give the engines a "
            "multiple of 2 GPUs.",
        ),
        (
            ["--actor-num-gpus-per-node", "4", "--colocate", "--rollout-num-gpus", "2"],
            "--rollout-num-gpus 2 differs from the trainer's 4 GPUs (--actor-num-nodes 1 x "
            "--actor-num-gpus-per-node 4); with --colocate the engines share the trainer's GPUs, so drop "
            "--rollout-num-gpus or set it to 4.",
        ),
        (
            ["--actor-num-gpus-per-node", "4", "--colocate", "--rollout-num-gpus-per-engine", "3"],
            "--rollout-num-gpus-per-engine 3 does not divide the trainer's 4 GPUs (--actor-num-nodes 1 x "
            "--actor-num-gpus-per-node 4), which --colocate engines share; use a divisor of 4.",
        ),
        (
            ["--rollout-num-gpus", "4", "--rollout-num-engines", "3"],
            "--rollout-num-engines 3 disagrees with the 4 engines of --rollout-num-gpus 4 / "
            "--rollout-num-gpus-per-engine 1; drop --rollout-num-engines.",
        ),
        (["--actor-num-nodes", "0"], "--actor-num-nodes must be at least 1, got 0."),
        (["--rollout-num-gpus", "0"], "--rollout-num-gpus must be at least 1, got 0."),
        (["--device", "mps"], "--device mps: a Ray layout places processes on cpu or cuda; use one of them."),
    ],
)
def test_inconsistent_flags_are_refused_in_one_sentence(flags, message):
    with pytest.raises(UsageError) as err:
        layout(*flags)
    assert str(err.value) == message


def test_missing_ray_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    for call in (placement.import_ray, placement.start_ray):
        with pytest.raises(UsageError, match=r"Ray is not installed; pip install 'miles-core\[ray\]'\.$"):
            call()


def test_modules_import_without_ray():
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import miles_core.distributed.placement, miles_core.distributed.engines\n"
        "assert 'torch' not in sys.modules, 'torch is imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
