"""Count the FP8 plugin's kernel instructions per weight in sm_90 SASS, compiled ahead of time on the CPU.

No GPU needed: Triton compiles each kernel variant for ``GPUTarget("cuda", 90, 32)`` with its bundled
ptxas, ``nvdisasm -c`` disassembles the cubin, and the inner K loop is the code from the label before the
first tensor-core instruction (HGMMA / QGMMA (FP8) for wgmma, HMMA for mma.sync) to the branch back to
that label. A decode expert kernel is bound by reading weights only if it issues few instructions per
weight it streams: ``per_weight`` = loop instructions / weights one thread's tile covers per iteration
(``BLOCK_N x BLOCK_K`` per weight tile over the 32 x num_warps threads; gate/up reads two tiles).

    python bench/kernel_sass.py [--modes fp8 fp8acc fp16] [--block-m 16 64] [--only NAME] [--opcodes]
        [--gate-up-tile BN:warps:stages] [--down-tile BN:warps:stages] [--dense-block-n 32 64] [--arch 90|89]

Prints one JSON line: ``{"variants": {name: {per_weight, loop, mma, spills, ...}}}``, or ``{"skipped":
reason}`` where Triton's ptxas / nvdisasm are missing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "plugins" / "miles_fp8"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

ROWS_SIG = {
    "a_ptr": "*bf16", "as_ptr": "*fp32", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "bounds_ptr": "*i32",
    "out_ptr": "*bf16", "rows": "i32", "n_out": "i32", "k_in": "i32", "stride_a": "i32", "n_chunks": "i32",
}  # fmt: skip
GATE_UP_SIG = {
    "x_ptr": "*bf16", "xs_ptr": "*fp32", "wg_ptr": "*fp8e4nv", "wu_ptr": "*fp8e4nv", "sg_ptr": "*fp32",
    "su_ptr": "*fp32", "src_ptr": "*i32", "bounds_ptr": "*i32", "out_ptr": "*bf16", "g_ptr": "*bf16",
    "u_ptr": "*bf16", "hidden": "i32", "inter": "i32", "stride_x": "i32", "stride_s": "i32",
    "n_chunks": "i32",
}  # fmt: skip

# i32 arguments that are multiples of 16 at every model shape (hidden, FFN, row strides), so a launch
# specializes them as such; row counts and loop bounds are left unspecialized
ALIGNED = {"n_out", "k_in", "stride_a", "hidden", "inter", "stride_x", "stride_s"}


def tools() -> tuple[Path, Path] | str:
    """(ptxas, nvdisasm) bundled with Triton, or one sentence saying what is missing."""
    try:
        import triton
    except ImportError:
        return "triton is not installed; install it to compile the kernels ahead of time."
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas, nvdisasm = bin_dir / "ptxas", bin_dir / "nvdisasm"
    for t in (ptxas, nvdisasm):
        if not t.exists():
            return f"{t.name} is missing from {bin_dir}; install a Triton wheel that bundles the CUDA tools."
    return ptxas, nvdisasm


def compile_sass(
    fn, sig: dict, consts: dict, num_warps: int, num_stages: int, nvdisasm: Path, arch: int = 90
) -> str:
    """sm_<arch> SASS text of ``fn`` specialized to ``consts`` (constexprs) with pointer/int ``sig``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{k: "constexpr" for k in consts}}
    # as a launch at the model's shapes specializes: pointers and sizes/strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k][0] == "*" or k in ALIGNED}
    consts = {(list(sig).index(k),): v for k, v in consts.items()}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        done = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True)
    return done.stdout


_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def k_loop(sass: str) -> dict:
    """The inner K loop of ``sass``: its instructions (opcode list), the MMA kind and whole-kernel spills.

    The loop is the innermost one around the first HGMMA/QGMMA/HMMA: from a label before it to a branch
    after it back to that label; ``spills`` counts local-memory loads and stores (LDL/STL) anywhere in
    the kernel."""
    items: list[tuple[str, str]] = []  # ("label", name) / ("insn", text)
    for line in sass.splitlines():
        if m := _LABEL.match(line):
            items.append(("label", m.group(1)))
        elif m := _INSN.search(line):
            items.append(("insn", m.group(1)))
    insns = [t for kind, t in items if kind == "insn"]
    spills = sum(1 for t in insns if re.search(r"\b(LDL|STL)\b", t))
    mmas = [i for i, (k, t) in enumerate(items) if k == "insn" and re.search(r"\b[HQI]G?MMA\b", t)]
    first = mmas[0] if mmas else None
    if first is None:
        return {"loop": 0, "mma": None, "spills": spills, "opcodes": {}}
    mma = re.search(r"\b[HQI]G?MMA\S*", items[first][1]).group(0)
    where = {t: i for i, (k, t) in enumerate(items) if k == "label"}
    loops = [  # (label index, branch index) of every backward branch around the first MMA
        (where[m.group(1)], j) for j, (k, t) in enumerate(items)
        if k == "insn" and j > first and (m := re.search(r"BRA `\((\.L_x_\d+)\)", t))
        and where[m.group(1)] < first
    ]  # fmt: skip
    if not loops:
        return {"loop": 0, "mma": mma, "spills": spills, "opcodes": {}}
    label_at, back = min(loops, key=lambda ij: ij[1] - ij[0])  # the innermost
    body = [t for k, t in items[label_at : back + 1] if k == "insn"]
    ops: dict[str, int] = {}
    for t in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    return {"loop": len(body), "mma": mma, "spills": spills, "opcodes": ops}


def variants(modes, block_ms, gate_up_tile, down_tile, dense_bns):
    """(name, kernel, sig, consts, warps, stages, weights a thread covers per loop iteration)."""
    from miles_fp8 import triton_experts, triton_fp8

    bk = triton_fp8.BLOCK
    for mode in modes:
        for bm in block_ms:
            swap = triton_fp8.swapped(bm)
            for preq in (False, True):
                x_ty = "*fp8e4nv" if preq else "*bf16"
                tag = f"{mode}/m{bm}{'/swap' if swap else ''}/{'preq' if preq else 'inkernel'}"
                bn, warps, stages = gate_up_tile
                consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "MODE": mode, "SAVE": False,
                          "SWAP": swap, "PREQ": preq}  # fmt: skip
                sig = dict(GATE_UP_SIG, x_ptr=x_ty)
                fn = triton_experts._fp8_gate_up_kernel
                yield f"gate_up/{tag}/n{bn}", fn, sig, consts, warps, stages, 2 * bn * bk / (32 * warps)
                bn, warps, stages = down_tile or down_default(swap)
                consts = {"GROUPED": True, "PREQ": preq, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                          "MODE": mode, "SWAP": swap}  # fmt: skip
                fn, sig = triton_fp8._fp8_rows_kernel, dict(ROWS_SIG, a_ptr=x_ty)
                yield f"down/{tag}/n{bn}", fn, sig, consts, warps, stages, bn * bk / (32 * warps)
        dense = triton_fp8.DENSE
        for bn in dense_bns:  # the dense tile depends on N only through BLOCK_N (`dense_block_n`)
            for preq in (False, True):
                bm = dense["BLOCK_M"]
                consts = {"GROUPED": False, "PREQ": preq, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                          "MODE": mode, "SWAP": triton_fp8.swapped(bm)}  # fmt: skip
                name = f"dense/{mode}/m{bm}/{'preq' if preq else 'inkernel'}/n{bn}"
                sig = dict(ROWS_SIG, a_ptr="*fp8e4nv" if preq else "*bf16")
                warps = dense["num_warps"]
                fn = triton_fp8._fp8_rows_kernel
                yield name, fn, sig, consts, warps, dense["num_stages"], bn * bk / (32 * warps)


def down_default(swap: bool) -> tuple[int, int, int]:
    """The down kernel's tile in `triton_experts` for a transposed (decode) or plain row block."""
    from miles_fp8 import triton_experts

    d = triton_experts.DOWN_SWAPPED if swap else triton_experts.DOWN
    return d["BLOCK_N"], d["num_warps"], d["num_stages"]


def _tile(text: str) -> tuple[int, int, int]:
    bn, warps, stages = (int(v) for v in text.split(":"))
    return bn, warps, stages


def main(argv=None) -> dict:
    from miles_fp8 import triton_experts

    g = triton_experts.GATE_UP
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = ["fp8", "fp8acc", "fp16", "bf16"]
    ap.add_argument("--modes", nargs="+", default=modes[:3], choices=modes)
    ap.add_argument("--block-m", nargs="+", type=int, default=[triton_experts.DECODE_BLOCK_M,
                                                                 triton_experts.PREFILL_BLOCK_M])  # fmt: skip
    ap.add_argument(
        "--gate-up-tile",
        type=_tile,
        default=(g["BLOCK_N"], g["num_warps"], g["num_stages"]),
        help="BLOCK_N:num_warps:num_stages of the gate/up kernel (default: the module's)",
    )
    ap.add_argument(
        "--down-tile",
        type=_tile,
        default=None,
        help="the down kernel's (default: DOWN_SWAPPED / DOWN by row block)",
    )
    ap.add_argument("--dense-block-n", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--arch", type=int, default=90, choices=[89, 90], help="sm_90 (Hopper) or sm_89 (Ada)")
    ap.add_argument("--only", default="", help="substring a variant name must contain")
    ap.add_argument("--opcodes", action="store_true", help="also print each loop's opcode histogram")
    args = ap.parse_args(argv)
    found = tools()
    if isinstance(found, str):
        result = {"skipped": found}
        print(json.dumps(result))
        return result
    out = {}
    for name, fn, sig, consts, warps, stages, per_thread in variants(
        args.modes, args.block_m, args.gate_up_tile, args.down_tile, args.dense_block_n
    ):
        if args.only not in name:
            continue
        loop = k_loop(compile_sass(fn, sig, consts, warps, stages, found[1], args.arch))
        row = {"per_weight": round(loop["loop"] / per_thread, 3), "loop": loop["loop"], "mma": loop["mma"],
               "spills": loop["spills"]}  # fmt: skip
        if args.opcodes:
            row["opcodes"] = loop["opcodes"]
        out[name] = row
    result = {"arch": f"sm_{args.arch}", "variants": out}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
