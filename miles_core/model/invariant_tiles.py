"""Launch configurations of the batch-invariant matmuls (`invariant_kernels.linear` and `experts`), picked
by shape, and the per-card probe that decides which of them may be used.

A row's result depends on the order its K products are added in: K from 0 in ``BLOCK_K`` steps into an
fp32 accumulator, each step split into the MMA instruction's k-steps. How many rows or columns share the
row's tile does not enter, as long as every configuration lowers to the same instruction family. So the
candidates of a dtype share ``BLOCK_K`` and the instruction (bf16/fp16 on Hopper: wgmma m64nNk16, which
needs ``BLOCK_M`` a multiple of 64 and ``num_warps`` a multiple of 4; fp32: ``ieee`` products on the CUDA
cores, one FMA after another) and differ in ``BLOCK_M`` / ``BLOCK_N`` / warps / stages. `select` picks one
from the row and column counts alone, so a launch's grid still follows from the shapes (CUDA graphs).

That rows get the same bits under every candidate is checked, not assumed: at first use on a CUDA card
(`kept`) each candidate runs on random problems with odd sizes and rows at tile edges, and is kept only if
every row equals the reference configuration's; if one differs, only the reference is used there (one
that does not compile or run there, say for want of shared memory, is left out).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import torch

log = logging.getLogger(__name__)

# name -> launch settings; the first of each family is its reference (the one used when the probe fails).
CANDIDATES: dict[str, dict[str, dict]] = {
    "mma16": {  # bf16 / fp16: wgmma m64nNk16 on sm_90, mma.sync m16n8k16 on sm_80 (one family per card)
        "m64n64": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        "m64n32": {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        "m64n128": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
        "m128n128": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        "m128n256": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    },
    "fp32": {  # ieee products on the CUDA cores (no TF32): sequential FMAs, any tile shape
        "m32n64": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3},
        "m64n128": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    },
}
# Which candidate a problem gets: the first rule whose row bound holds, whose candidate is kept on the card
# and whose column block is not wider than the problem needs (max(32, next power of two of N)); else the
# reference. Rows: M for `linear`; for `experts` the copies per expert on average.
RULES: dict[str, list[tuple[float, str]]] = {
    "mma16": [
        (64, "m64n32"),
        (512, "m64n128"),
        (math.inf, "m128n256"),
        (math.inf, "m128n128"),
        (math.inf, "m64n128"),
    ],
    "fp32": [(32, "m32n64"), (math.inf, "m64n128")],
}
# Accumulator elements a tile may hold: the experts' gate/up kernel keeps two (gate and up).
MAX_TILE = {"linear": 128 * 256, "gate_up": 128 * 128, "down": 128 * 256}

# (device index, dtype) -> names kept by the probe on that card
_kept: dict[tuple[int, torch.dtype], tuple[str, ...]] = {}


def family(dtype: torch.dtype) -> str:
    """The candidate family of a dtype: ``fp32`` or ``mma16`` (bf16, fp16)."""
    if dtype == torch.float32:
        return "fp32"
    if dtype in (torch.bfloat16, torch.float16):
        return "mma16"
    raise ValueError(f"the batch-invariant matmuls take fp32, bf16 or fp16, not {dtype}")


def reference(fam: str) -> str:
    return next(iter(CANDIDATES[fam]))


def select(rows: float, n: int, fam: str, kept: tuple[str, ...], kind: str = "linear") -> dict:
    """The launch settings for ``rows`` rows (a count from the shapes only) and ``n`` output columns."""
    width = max(32, 1 << max(0, n - 1).bit_length())
    for bound, name in RULES[fam]:
        c = CANDIDATES[fam][name]
        fits = c["BLOCK_N"] <= width and c["BLOCK_M"] * c["BLOCK_N"] <= MAX_TILE[kind]
        if rows <= bound and name in kept and fits:
            return c
    return CANDIDATES[fam][reference(fam)]


def kept(device: torch.device, dtype: torch.dtype, linear: Callable, experts: Callable) -> tuple[str, ...]:
    """The candidates usable on ``device`` for ``dtype``: all of them under the interpreter (its tests check
    the rows directly); on CUDA the ones `probe` keeps, probed once per card and dtype. Inside a CUDA graph
    capture before the probe ran: the reference alone, not remembered (the engine's eager prefill probes)."""
    fam = family(dtype)
    if device.type != "cuda":
        return tuple(CANDIDATES[fam])
    key = (device.index if device.index is not None else torch.cuda.current_device(), dtype)
    if key not in _kept:
        if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
            return (reference(fam),)
        _kept[key] = probe(torch.device("cuda", key[0]), dtype, linear, experts)
    return _kept[key]


# (M, N, K) of the linear problems: odd sizes, a K tail, rows at 64/128-row tile edges; experts: tokens,
# hidden, expert FFN, experts, top-k.
PROBE_LINEAR = ((1, 40, 72), (67, 136, 200), (193, 320, 1000), (257, 264, 130))
PROBE_EXPERTS = ((37, 136, 72, 4, 2), (300, 72, 200, 3, 2))


def _expert_case(tokens, hidden, inter, e, k, device, dtype, g, spare_last=True):
    """Sorted copies with uneven experts (the last one empty unless not ``spare_last``), as
    `moe.expert_order` gives them: x, src, bounds, gate_up, down."""
    x = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    idx = torch.randint(0, max(1, e - spare_last), (tokens * k,), generator=g, device=device)
    order = torch.argsort(idx, stable=True)
    src = (order // k).to(torch.int32)
    counts = torch.bincount(idx, minlength=e)
    bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    gate_up = (torch.randn(e, 2 * inter, hidden, generator=g, device=device) / hidden**0.5).to(dtype)
    down = (torch.randn(e, hidden, inter, generator=g, device=device) / inter**0.5).to(dtype)
    return x, src, bounds, gate_up, down


def probe(
    device: torch.device, dtype: torch.dtype, linear: Callable, experts: Callable, linear_sizes=PROBE_LINEAR,
    expert_sizes=PROBE_EXPERTS,
) -> tuple[str, ...]:  # fmt: skip
    """Names of the candidates whose every row equals the reference's on ``device``: all that run there, or
    the reference alone if any candidate gives one row other bits (one warning line says which and where).
    A candidate that does not compile or run there (say, too little shared memory) is left out (a warning).

    :param linear: ``linear(x [M, K], w [N, K], cfg) -> [M, N]`` with the given launch settings.
    :param experts: ``experts(x, src, bounds, gate_up, down, cfg=cfg) -> [copies, H]`` likewise."""
    fam = family(dtype)
    cfgs, ref = CANDIDATES[fam], reference(fam)
    g = torch.Generator(device=device).manual_seed(0)
    cases, want = [], {}  # (label, run(cfg) -> tensor); label -> the reference's rows
    for m, n, k in linear_sizes:
        x = torch.randn(m, k, generator=g, device=device).to(dtype)
        w = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(dtype)
        edge = [r for r in (0, 63, 64, 127, 128, m - 1) if r < m]  # rows alone, at tile edges
        full = linear(x, w, cfgs[ref])  # the reference runs (an error here is the mode's own)
        cases.append((f"linear {m}x{n}x{k}", partial(_batch_and_alone, linear, x, w, edge)))
        want[cases[-1][0]] = torch.cat([full, full[edge]])  # alone or in the batch: the batch's rows
    for size in expert_sizes:
        case = _expert_case(*size, device, dtype, g)
        cases.append((f"experts {size}", lambda c, case=case: experts(*case, cfg=c)))
        want[cases[-1][0]] = experts(*case, cfg=cfgs[ref])
    keep = []
    for name, cfg in cfgs.items():
        try:
            bad = next((label for label, run in cases if not torch.equal(run(cfg), want[label])), None)
        except Exception as e:
            log.warning("batch-invariant %s matmuls on %s: %s left out (%s: %s)", fam, device, name,
                        type(e).__name__, str(e)[:200])  # fmt: skip
            continue
        if bad is not None:
            why = f"{name} on {bad} gives other bits"
            log.warning("batch-invariant %s matmuls on %s use %s alone: %s", fam, device, ref, why)
            return (ref,)
        keep.append(name)
    log.info("batch-invariant %s matmuls on %s: candidates %s give the reference's bits", fam, device, keep)
    return tuple(keep)


def _batch_and_alone(linear: Callable, x, w, edge: list[int], cfg: dict) -> torch.Tensor:
    """The rows of x as one batch, then the ``edge`` rows each alone."""
    return torch.cat([linear(x, w, cfg), *(linear(x[r : r + 1], w, cfg) for r in edge)])
