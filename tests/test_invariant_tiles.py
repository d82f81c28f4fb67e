"""Tile configurations of the batch-invariant matmuls picked by shape (`miles_core.model.invariant_tiles`).

What the mode needs: a row gets the same bits whichever candidate its call selects. On CPU: the selection
rules by hand; under Triton's interpreter (fp32) every candidate's rows equal the reference's, a row alone
equals the row in a batch that selects another candidate (linear and experts), and the probe keeps every
candidate or, when one adds K in other steps, the reference alone; an ahead-of-time compile for sm_90
shows every bf16 candidate on the same wgmma k16 instruction and the fp32 ones on no tensor-core
instruction. On a GPU (`gpu` marker) the probe's verdict and rows across every kept candidate.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from triton_interp import needs_interpreter, run_interpreted

from miles_core.model import invariant_tiles as tiles

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ALL = {f: tuple(c) for f, c in tiles.CANDIDATES.items()}


def _name(fam, cfg):
    return next(n for n, c in tiles.CANDIDATES[fam].items() if c is cfg)


def test_select_follows_the_rules_by_rows_columns_and_kept_candidates():
    sel = lambda rows, n, fam="mma16", kept=None, kind="linear": _name(  # noqa: E731
        fam, tiles.select(rows, n, fam, ALL[fam] if kept is None else kept, kind)
    )
    # decode-sized rows (M <= 64), then up to 512, then training sizes; the bounds are inclusive
    assert [sel(m, 1024) for m in (1, 64, 65, 512, 513, 16384)] == [
        "m64n32", "m64n32", "m64n128", "m64n128", "m128n256", "m128n256"
    ]  # fmt: skip
    # gate/up holds two accumulators: at most 128x128
    assert sel(2048, 512, kind="gate_up") == "m128n128" and sel(2048, 1024, kind="down") == "m128n256"
    # a tile no wider than the problem needs: N = 100 -> 128 columns at most, N = 32 -> 32
    assert sel(16384, 100) == "m128n128" and sel(200, 100) == "m64n128" and sel(200, 32) == "m64n64"
    assert sel(16384, 128) == "m128n128" and sel(16384, 129) == "m128n256"
    assert sel(16384, 32) == "m64n64" and sel(3, 32) == "m64n32"
    # a candidate the probe dropped is skipped; the reference alone -> the reference everywhere
    assert sel(1, 1024, kept=("m64n64", "m64n128")) == "m64n128"
    assert {sel(m, 4096, kept=("m64n64",)) for m in (1, 100, 10**5)} == {"m64n64"}
    assert [sel(m, 100, "fp32") for m in (1, 32, 33)] == ["m32n64", "m32n64", "m64n128"]
    assert sel(33, 40, "fp32") == "m32n64"  # 128 columns for N = 40: too wide
    assert tiles.reference("mma16") == "m64n64" and tiles.reference("fp32") == "m32n64"


def test_candidates_of_a_family_share_block_k_and_the_instruction_constraints():
    for fam, cands in tiles.CANDIDATES.items():
        assert len({c["BLOCK_K"] for c in cands.values()}) == 1, fam
        assert {name for _, name in tiles.RULES[fam]} <= set(cands), fam
        assert tiles.RULES[fam][-1][0] == math.inf, fam  # every row count has a rule
    for c in tiles.CANDIDATES["mma16"].values():  # Hopper's wgmma: 64-row warpgroup tiles
        assert c["BLOCK_M"] % 64 == 0 and c["num_warps"] % 4 == 0 and c["BLOCK_N"] % 8 == 0, c
    assert tiles.family(torch.bfloat16) == tiles.family(torch.float16) == "mma16"
    with pytest.raises(ValueError, match="fp32, bf16 or fp16, not torch.float64"):
        tiles.family(torch.float64)


INTERP = r"""
import logging, torch
from miles_core.model import invariant_kernels as ik, invariant_tiles as tiles
from miles_core.model.moe import expert_bounds, expert_order

g = torch.Generator().manual_seed(0)
rnd = lambda *s: torch.randn(*s, generator=g)

# every candidate of both families (bf16 geometry on fp32 data) gives the reference's rows; odd M, N, K.
# The emulated dot holds BLOCK_M x BLOCK_K x BLOCK_N products: the interpreter takes at most 2^20.
fits = lambda c: c["BLOCK_M"] * c["BLOCK_K"] * c["BLOCK_N"] <= 2**20
x, w = rnd(131, 100), rnd(136, 100) * 0.1
for fam, cands in tiles.CANDIDATES.items():
    want = ik._linear_fwd(x, w, cands[tiles.reference(fam)])
    assert torch.allclose(want.double(), x.double() @ w.double().T, rtol=1e-4, atol=1e-4)
    for name, cfg in filter(lambda nc: fits(nc[1]), cands.items()):
        assert torch.equal(ik._linear_fwd(x, w, cfg), want), (fam, name)
        assert torch.equal(ik._linear_fwd(x[127:128], w, cfg), want[127:128]), (fam, name)

# selection boundaries through the public op: M = 1 selects m32n64, M = 131 m64n128
small, big = (tiles.select(m, 136, "fp32", ALL["fp32"]) for m in (1, 131))
assert small["BLOCK_M"] == 32 and big["BLOCK_M"] == 64, (small, big)
full = ik.linear(x, w)
for r in (0, 31, 32, 63, 64, 130):
    assert torch.equal(ik.linear(x[r : r + 1], w), full[r : r + 1]), r

# experts: 4 experts top-2; 3 tokens (1.5 copies an expert: m32n64) vs 150 (75: m64n128 for down)
E, H, I, K = 4, 72, 40, 2
gu, dn, xt = rnd(E, 2 * I, H) * 0.2, rnd(E, H, I) * 0.2, rnd(150, H)
idx = torch.randint(0, E - 1, (150, K), generator=g)
def run(rows, cfg=None):
    flat = idx[rows].reshape(-1)
    order, dest = expert_order(flat, E)
    ys = ik._experts_fwd(xt[rows], (order // K).to(torch.int32), expert_bounds(flat, E), gu, dn, cfg=cfg)
    return ys[dest].view(len(rows), K, H)
down = [tiles.select(t * K / E, H, "fp32", ALL["fp32"], "down")["BLOCK_M"] for t in (3, 150)]
assert down == [32, 64], down
rows = torch.arange(150)
full = run(rows)
for sub in ([0], [5, 149, 64]):
    sub = torch.tensor(sub)
    assert torch.equal(run(sub), full[sub]), sub
# what the kernels ask `select`: rows per expert on average (here 1.5), the kernel's columns and kind
asked, pick = [], tiles.select
def spy(rows, n, fam, kept, kind="linear"):
    asked.append((rows, n, kind))
    return pick(rows, n, fam, kept, kind)
tiles.select = spy
run(torch.tensor([0, 1, 2]))
ik.linear(x[:5], w)
tiles.select = pick
assert asked == [(1.5, I, "gate_up"), (1.5, H, "down"), (5, 136, "linear")], asked
for fam, cands in tiles.CANDIDATES.items():  # (fp32 data: `full` is the fp32 family's)
    want = run(rows, cands[tiles.reference(fam)])
    assert fam != "fp32" or torch.equal(want, full)
    for name, cfg in filter(lambda nc: fits(nc[1]), cands.items()):
        assert torch.equal(run(rows, cfg), want), (fam, name)

# the probe keeps every candidate; one that does not run (a 48-column tile: not a power of two) is left out;
# one adding K in 16-column steps makes it keep the reference alone
small = dict(linear_sizes=((1, 40, 40), (67, 72, 50)), expert_sizes=((9, 40, 40, 3, 2),))
cpu = torch.device("cpu")
seen = []
class Grab(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
tiles.log.addHandler(Grab())
assert tiles.probe(cpu, torch.float32, ik._linear_fwd, ik._experts_fwd, **small) == ALL["fp32"]
assert seen == []
tiles.CANDIDATES["fp32"]["n48"] = dict(tiles.CANDIDATES["fp32"]["m32n64"], BLOCK_N=48)
assert tiles.probe(cpu, torch.float32, ik._linear_fwd, ik._experts_fwd, **small) == ALL["fp32"]
assert len(seen) == 1 and "n48 left out" in seen[0], seen
tiles.CANDIDATES["fp32"]["k16"] = dict(tiles.CANDIDATES["fp32"]["m32n64"], BLOCK_K=16)
assert tiles.probe(cpu, torch.float32, ik._linear_fwd, ik._experts_fwd, **small) == ("m32n64",)
assert len(seen) == 3 and "m32n64 alone: k16 on linear 1x40x40 gives other bits" in seen[2], seen
# k16 alone differs from the reference on the experts too (the probe's second kind of problem)
del tiles.CANDIDATES["fp32"]["n48"]
small["linear_sizes"] = ()
assert tiles.probe(cpu, torch.float32, ik._linear_fwd, ik._experts_fwd, **small) == ("m32n64",)
assert "k16 on experts (9, 40, 40, 3, 2)" in seen[-1], seen
print("ok")
"""


@needs_interpreter
def test_rows_are_identical_across_candidates_and_selection_boundaries_under_the_interpreter():
    run_interpreted(f"ALL = {ALL!r}\n" + INTERP)


def _ptxas_available() -> bool:
    import importlib.util

    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


MMA = re.compile(r"(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+|\bmma\.[\w.]+)")


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled ptxas")
def test_every_bf16_candidate_lowers_to_the_same_wgmma_k16_on_hopper():
    """AOT compile for sm_90 (no GPU): a candidate on mma.sync (a 32-row tile, 2 warps) or on another
    k-step would add a row's products in another order; fp32 candidates use no tensor-core instruction."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from miles_core.model import invariant_kernels as ik

    def ptx(fn, sig: dict, cfg: dict, dtype: str) -> str:
        consts = {k: v for k, v in cfg.items() if k.startswith("BLOCK")} | {"PREC": ik._prec(dtype)}
        sig = {k: (f"*{dtype_name[dtype]}" if v == "*" else v) for k, v in sig.items()}
        sig = {k: sig.get(k, "constexpr") for k in fn.arg_names}  # the kernel's argument order
        const_at = {(list(sig).index(k),): v for k, v in consts.items()}
        src = ASTSource(fn=fn, signature=sig, constexprs=const_at)
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]

    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    linear = {"x_ptr": "*", "w_ptr": "*", "out_ptr": "*", "m": "i32", "n": "i32", "k": "i32", "sxm": "i32",
              "swn": "i32"}  # fmt: skip
    gate_up = {"x_ptr": "*", "w_ptr": "*", "src_ptr": "*i32", "bounds_ptr": "*i32", "act_ptr": "*",
               "hidden": "i32", "inter": "i32", "sx": "i32", "swe": "i32", "splits": "i32"}  # fmt: skip
    down = {"a_ptr": "*", "w_ptr": "*", "bounds_ptr": "*i32", "out_ptr": "*", "hidden": "i32", "inter": "i32",
            "swe": "i32", "splits": "i32"}  # fmt: skip
    kernels = ((ik._linear_kernel, linear), (ik._expert_gate_up_kernel, gate_up),
               (ik._expert_down_kernel, down))  # fmt: skip
    wgmma = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16"
    for name, cfg in tiles.CANDIDATES["mma16"].items():
        for fn, sig in kernels:
            found = set(MMA.findall(ptx(fn, sig, cfg, torch.bfloat16)))
            assert found and all(re.fullmatch(wgmma, i) for i in found), (name, fn.__name__, found)
    for name, cfg in tiles.CANDIDATES["fp32"].items():
        found = set(MMA.findall(ptx(ik._linear_kernel, linear, cfg, torch.float32)))
        assert not found, (name, found)  # ieee: FMAs, no TF32 tensor-core product


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_kept_candidate_gives_rows_the_same_bits_on_cuda(dtype):
    """On the card: the probe keeps every candidate (else the mode runs the reference alone: slower), and at
    the 0.7B bench shapes every kept candidate's rows equal the reference's, alone or in a batch."""
    from miles_core.model import invariant_kernels as ik

    fam, dev = tiles.family(dtype), torch.device("cuda")
    kept = ik._kept(torch.empty(0, device=dev, dtype=dtype))
    assert kept == tuple(tiles.CANDIDATES[fam]), f"the probe kept only {kept} (see the warning above)"
    g = torch.Generator(device=dev).manual_seed(1)
    for m, n, k in ((64, 1024, 1024), (1000, 2816, 1024), (333, 32000, 1024), (4097, 256, 1024)):
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        w = (torch.randn(n, k, device=dev, generator=g) / 32).to(dtype)
        want = ik._linear_fwd(x, w, tiles.CANDIDATES[fam][tiles.reference(fam)])
        for name in kept:
            cfg = tiles.CANDIDATES[fam][name]
            assert torch.equal(ik._linear_fwd(x, w, cfg), want), (name, m, n, k)
            for r in (0, 63, 64, m - 1):
                assert torch.equal(ik._linear_fwd(x[r : r + 1], w, cfg)[0], want[r]), (name, m, r)
        assert torch.equal(ik.linear(x, w), want)  # the selected candidate
    case = tiles._expert_case(4096, 1024, 512, 32, 4, dev, dtype, g)  # the bench's training experts
    want = ik._experts_fwd(*case, cfg=tiles.CANDIDATES[fam][tiles.reference(fam)])
    for name in kept:
        assert torch.equal(ik._experts_fwd(*case, cfg=tiles.CANDIDATES[fam][name]), want), name
