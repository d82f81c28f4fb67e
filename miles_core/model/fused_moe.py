"""Triton expert kernels for decode-sized MoE batches (a few rows per expert).

`Experts` calls `fused_experts` instead of its two grouped GEMMs when the module's `fused_max_rows` allows
it. The training loop sets that on the rollout model: by default on CUDA with triton, for decode steps
of up to ~16 token copies an expert (`default_max_rows`); --no-rollout-fused-moe turns it off. Two
kernels, each with a static grid over (expert, output tile), so they can be captured in a CUDA graph:

1. gate/up + SwiGLU: for expert e, read its routed rows of x straight from the token rows (no gathered
   copy), multiply by the e-th gate and up tiles and write ``silu(gate) * up`` (fp32 accumulate);
2. down: multiply each expert's activations by its down tile.

Each weight tile is read once per ``BLOCK_M`` rows of its expert, so at decode sizes every routed
expert's weights stream through exactly once. Rows come out in expert-sorted order, like the grouped
path; un-permuting and weighting stays with the caller.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the
CPU tests check them.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the grouped / looped paths serve
    triton = None
    tl = None

BLOCK_M = 16  # rows of one expert per tile: decode batches route a few rows to each expert
# Tile widths and launch settings of the two kernels (bench/fused_moe_tune.py measures the choices).
# H200, batch 64 (256 copies over 32 experts): both kernels together 0.031 ms vs 0.061 ms for the two
# grouped GEMMs, ~3.2 TB/s of expert weights; the top settings were within 3% of each other.
GATE_UP = {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
DOWN = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}


def default_max_rows(num_experts: int, top_k: int, batch: int) -> int:
    """The token-copy limit (`set_fused_moe`) the engine uses by default: every decode step of up to
    `batch` rows, as long as an expert gets about one ``BLOCK_M`` tile of rows on average. Beyond that
    the kernels stream an expert's weights once per tile and the grouped GEMMs win (H200, 0.7B bench
    model: batch 64, 8 rows an expert, 55.9k vs 45.0k tok/s; batch 256, 32 rows, 112.0k vs 129.1k)."""
    return min(batch * top_k, BLOCK_M * num_experts)


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`'s device (CUDA, or Triton's interpreter on CPU)."""
    if triton is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _gate_up_act_kernel(
        x_ptr, w_ptr, src_ptr, bounds_ptr, out_ptr, hidden, inter, stride_x, stride_we, n_chunks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0).to(tl.int64)  # e * stride_we may pass 2^31
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        w_gate = w_ptr + e * stride_we + n[:, None] * hidden  # rows [0, inter) of gate_up_proj[e]
        w_up = w_ptr + e * stride_we + (inter + n)[:, None] * hidden  # rows [inter, 2 * inter)
        # The loop bound is static (enough chunks for every copy) and empty chunks are skipped: a
        # data-dependent bound would need the expert's row count on the host.
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # copies * row width may pass 2^31
                m_ok = m < end
                src = tl.load(src_ptr + m, mask=m_ok, other=0).to(tl.int64)
                acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, hidden, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < hidden
                    xmask = m_ok[:, None] & k_ok[None, :]
                    xt = tl.load(x_ptr + src[:, None] * stride_x + k[None, :], mask=xmask, other=0.0)
                    wmask = n_ok[:, None] & k_ok[None, :]
                    wg = tl.load(w_gate + k[None, :], mask=wmask, other=0.0)
                    wu = tl.load(w_up + k[None, :], mask=wmask, other=0.0)
                    acc_g += tl.dot(xt, tl.trans(wg))
                    acc_u += tl.dot(xt, tl.trans(wu))
                act = acc_g * tl.sigmoid(acc_g) * acc_u
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(
                    out_ptr + m[:, None] * inter + n[None, :], act.to(out_ptr.dtype.element_ty), mask=omask
                )

    @triton.jit
    def _down_kernel(
        a_ptr, w_ptr, bounds_ptr, out_ptr, hidden, inter, stride_we, n_chunks,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        e = tl.program_id(0).to(tl.int64)  # e * stride_we may pass 2^31
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        start = tl.load(bounds_ptr + e)
        end = tl.load(bounds_ptr + e + 1)
        w = w_ptr + e * stride_we + n[:, None] * inter  # down_proj[e] rows n
        for c in range(0, n_chunks):
            m0 = start + c * BLOCK_M
            if m0 < end:
                m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # copies * row width may pass 2^31
                m_ok = m < end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, inter, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = k < inter
                    amask = m_ok[:, None] & k_ok[None, :]
                    a = tl.load(a_ptr + m[:, None] * inter + k[None, :], mask=amask, other=0.0)
                    wt = tl.load(w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                    acc += tl.dot(a, tl.trans(wt))
                omask = m_ok[:, None] & n_ok[None, :]
                tl.store(
                    out_ptr + m[:, None] * hidden + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask
                )


# A custom op, so a compiled decode step calls the two launches as one opaque op (nothing for dynamo to
# trace inside), and CUDA-graph capture records them like any other kernel.
@torch.library.custom_op("miles::fused_experts", mutates_args=())
def fused_experts(
    x: torch.Tensor, src: torch.Tensor, bounds: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Expert outputs for the token copies in expert-sorted order.

    :param x: ``[N, H]`` token rows (contiguous).
    :param src: int ``[M]``: the token row of each sorted copy (``order // k``).
    :param bounds: int32 ``[E + 1]``: expert e owns sorted copies ``bounds[e] .. bounds[e+1]-1``.
    :param gate_up: ``[E, 2I, H]`` (rows ``[:I]`` gate, ``[I:]`` up), ``down``: ``[E, H, I]``; x's dtype.
    :returns: ``[M, H]`` in x's dtype: ``down_e(silu(gate_e(x)) * up_e(x))`` per copy.
    """
    if triton is None:
        raise RuntimeError("fused_experts needs triton (pip install triton)")
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    m = src.numel()
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    chunks = triton.cdiv(m, BLOCK_M)  # enough for an expert that got every copy
    c1, c2 = _launch_config(GATE_UP), _launch_config(DOWN)
    grid1 = (num_experts, triton.cdiv(inter, c1["BLOCK_N"]))
    _gate_up_act_kernel[grid1](
        x, gate_up, src, bounds, act, hidden, inter, x.stride(0), gate_up.stride(0), chunks,
        BLOCK_M=BLOCK_M, **c1,
    )  # fmt: skip
    grid2 = (num_experts, triton.cdiv(hidden, c2["BLOCK_N"]))
    _down_kernel[grid2](act, down, bounds, out, hidden, inter, down.stride(0), chunks, BLOCK_M=BLOCK_M, **c2)
    return out


def _launch_config(cfg: dict) -> dict:
    """The kernel arguments of a config; pipelining settings only where they mean something (CUDA)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"]}
    return dict(cfg)


@fused_experts.register_fake
def _(x, src, bounds, gate_up, down):
    return x.new_empty(src.shape[0], gate_up.shape[-1])
