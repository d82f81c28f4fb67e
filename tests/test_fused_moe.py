"""The Triton decode kernels for MoE experts (`miles_core.model.fused_moe`, --rollout-fused-moe) give the
experts' outputs: under Triton's interpreter on CPU (when triton is installed) and compiled on CUDA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from triton_interp import needs_interpreter, run_interpreted

ROOT = Path(__file__).resolve().parents[1]


CHECK = """
import torch
from miles_core.model import Experts, set_fused_moe

torch.manual_seed(0)
experts = Experts(8, 128, 64)
with torch.no_grad():
    experts.gate_up_proj.normal_(0, 0.1)
    experts.down_proj.normal_(0, 0.1)
x = torch.randn(12, 128)
idx = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
idx[:5, 0] = 3  # one expert with more copies than a 16-row block would hold without the chunk loop
w = torch.rand(12, 2)
with torch.no_grad():
    ref = experts(x, idx, w)  # the per-expert loop
    assert set_fused_moe(experts, 64) == 1
    fused = experts(x, idx, w)
torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
with torch.no_grad():  # 80 copies > 64: the loop serves again
    xb, ib, wb = torch.randn(40, 128), torch.randint(0, 8, (40, 2)), torch.rand(40, 2)
    out = experts(xb, ib, wb)
    set_fused_moe(experts, 0)
    assert torch.equal(out, experts(xb, ib, wb))
print("ok")
"""


@needs_interpreter
def test_fused_experts_match_the_loop_under_the_triton_interpreter():
    run_interpreted(CHECK)


def test_fused_kernels_stay_off_unless_set():
    from miles_core.model import Experts, set_fused_moe
    from miles_core.model.fused_moe import available

    experts = Experts(4, 16, 8)
    assert experts.fused_max_rows == 0
    assert set_fused_moe(torch.nn.Sequential(experts, Experts(4, 16, 8)), 32) == 2
    assert experts.fused_max_rows == 32
    if importlib.util.find_spec("triton") is None:
        assert not available(torch.zeros(1))  # CPU-only install: the grouped / looped paths serve


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_experts_match_grouped_gemms_in_bf16_on_cuda():
    from miles_core.model import Experts, set_fused_moe

    torch.manual_seed(0)
    experts = Experts(32, 1024, 512).cuda().to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(32, device="cuda")[:4] for _ in range(64)])
    w = torch.softmax(torch.rand(64, 4, device="cuda"), -1)
    with torch.no_grad():
        ref = experts(x, idx, w)
        set_fused_moe(experts, 16 * 32)
        fused = experts(x, idx, w)
    # fp32 accumulation in both; the kernel keeps silu(gate) * up in fp32 where the grouped path rounds
    # it to bf16, so they agree to bf16 rounding.
    assert ((fused.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_decodes_with_fused_experts_under_compiled_cuda_graphs(tiny_ckpt):
    from miles_core.engine import Engine
    from miles_core.model import load_model, set_fused_moe

    model = load_model(tiny_ckpt, dtype=torch.bfloat16, device="cuda").eval()
    prompts = [[3 + i, 4, 5 + 2 * i] for i in range(6)]
    params = {"temperature": 0.0, "max_new_tokens": 16}
    outs = []
    for fused in (False, True):
        set_fused_moe(model, 64 if fused else 0)
        engine = Engine(model, None, max_batch_size=8, seed=0)
        engine._eos = set()
        engine.cuda_graph = engine.compile = True
        outs.append(engine.generate_batch(prompts, params))
    same = sum(a == b for x, y in zip(*outs) for a, b in zip(x.output_ids, y.output_ids))
    assert same >= 0.9 * 6 * 16  # bf16 rounding differs (fp32 SwiGLU in the kernel): near-ties may flip


def test_default_limit_keeps_the_kernels_to_a_few_rows_an_expert():
    from miles_core.model.fused_moe import BLOCK_M, default_max_rows

    assert default_max_rows(32, 4, 64) == 256  # the whole batch: 8 copies an expert
    assert default_max_rows(32, 4, 256) == BLOCK_M * 32  # 32 an expert: grouped GEMMs from there on
    assert default_max_rows(128, 8, 8) == 64
