"""The CUDA rows kernels (csrc/cuda/ultimus_cuda.cuh) through the offline SASS analysis tool sass_stats
(a development tool beside the project; its README says how to read the output). The tool's own CUDA
mirror knows only the generic kernels; this script compiles the kernels of ultimus_cuda.cuh for sm_90
without their launchers, with one explicit instantiation per rows kernel and dtype, and describes the
launches as the launchers make them (128 threads, a persistent grid of as many blocks as fit).

    python bench/sass_cuda.py --tool <path to>/sass_stats.py [--dtypes float32,bfloat16] [--kernels fwd,bwd]

A model, not a measurement: claim speed only from `bench/attn.py` on a GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALAR = {"float32": "float", "bfloat16": "c10::BFloat16", "float16": "c10::Half"}
D, d, THREADS = 48, 8, 128  # the size the rows kernels are compiled for; their block size
SIGNATURES = {  # kernel -> (parameters after the template arguments, pointer names in order)
    "fwd": ("(const {s}*, {s}*, DeviceParams<float>, int64_t, bool)", ["x", "y"]),
    "fwd_bf16": ("(const {s}*, {s}*, DeviceParams<float>, int64_t, bool)", ["x", "y"]),  # bf16 only
    "bwd": (
        "(const {s}*, const {s}*, {s}*, float*, DeviceParams<float>, int64_t, bool)",
        ["gy", "x", "gx", "partials"],
    ),
    "bwd_half": (  # float16 and bfloat16 only
        "(const {s}*, const {s}*, {s}*, float*, DeviceParams<float>, int64_t, bool)",
        ["gy", "x", "gx", "partials"],
    ),
    "stack_fwd": ("(const {s}*, {s}*, const float*, int, float, int64_t, bool)", ["x", "y", "packed"]),
    "stack_fwd_tc": ("(const {s}*, {s}*, const float*, int, float, int64_t, bool)", ["x", "y", "packed"]),
    "stack_bwd": (
        "(const {s}*, const {s}*, {s}*, float*, const float*, int, float, int64_t, bool)",
        ["gy", "x", "gx", "partials", "packed"],
    ),
    "stack_bwd_tc": (
        "(const {s}*, const {s}*, {s}*, float*, const float*, int, float, int64_t, bool)",
        ["gy", "x", "gx", "partials", "packed"],
    ),
}
ROLES = {"x": "act_in", "gy": "act_in", "y": "act_out", "gx": "act_out", "partials": "partial"}


def symbol(kernel: str, dtype: str) -> str:
    """The template instance of a kernel, as written in the source (and demangled)."""
    if kernel == "fwd_bf16":
        return f"ultimus_fwd_bf16_kernel<{D}, {d}>"
    if kernel == "bwd_half":
        return f"ultimus_bwd_half_kernel<{SCALAR[dtype]}, {D}, {d}>"
    if kernel in ("stack_fwd_tc", "stack_bwd_tc"):
        return f"ultimus_{kernel}_kernel<{SCALAR[dtype]}, {D}, {d}>"
    return f"ultimus_{kernel}_rows_kernel<{SCALAR[dtype]}, {D}, {d}>"


def applies(kernel: str, dtype: str) -> bool:
    if kernel == "fwd_bf16":
        return dtype == "bfloat16"
    if kernel == "bwd_half":
        return dtype != "float32"
    return True


def load_tool(path: str):
    spec = importlib.util.spec_from_file_location("sass_stats", path)
    tool = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))  # it imports its sassemu beside it
    spec.loader.exec_module(tool)
    return tool


def build(tool, dtypes, kernels):
    """The cubin of the rows kernels (cached by the source text) and ptxas's report."""
    source = (ROOT / "csrc" / "cuda" / "ultimus_cuda.cuh").read_text()
    cut = source.index("// Launchers")
    cut = source.rindex("// ----", 0, cut)
    lines = [
        f"template __global__ void {symbol(k, t)}" + SIGNATURES[k][0].format(s=SCALAR[t]) + ";"
        for t in dtypes
        for k in kernels
        if applies(k, t)
    ]
    unit = source[:cut] + "\n".join(lines) + "\n}  // namespace\n}  // namespace ultimus\n"
    unit = unit.replace('#include "../ultimus.h"', f'#include "{ROOT / "csrc" / "ultimus.h"}"')
    flags, includes = tool.cuda_flags(ROOT)
    key = hashlib.sha256((unit + " ".join(flags)).encode()).hexdigest()[:16]
    work = Path(tempfile.gettempdir()) / "ultimus_sass_cuda"
    work.mkdir(exist_ok=True)
    cubin, log = work / f"{key}.cubin", work / f"{key}.ptxas.txt"
    if not cubin.exists():
        (work / f"{key}.cu").write_text(unit)
        nvcc = shutil.which("nvcc") or tool.find_tool("nvcc")
        cmd = [nvcc, "-arch=sm_90", "-cubin", "-Xptxas", "-v", *flags, *[f"-I{p}" for p in includes]]
        run = subprocess.run([*cmd, "-o", str(cubin), str(work / f"{key}.cu")], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-6000:])
        log.write_text(run.stdout + run.stderr)
    return cubin, log.read_text()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", required=True, help="the path of sass_stats.py")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes: float32, bfloat16, float16")
    ap.add_argument(
        "--kernels",
        default="fwd,fwd_bf16,bwd,bwd_half,stack_fwd,stack_fwd_tc,stack_bwd,stack_bwd_tc",
        help="which kernels, comma-separated (fwd_bf16: the bf16 forward on the tensor cores; bwd_half: the "
        "half-precision backward with its projections on the tensor cores, which the launcher runs in place of "
        "bwd for float16 and bfloat16; stack_fwd_tc and stack_bwd_tc: the stack kernels on the tensor cores, "
        "which the launcher runs in place of stack_fwd and stack_bwd from sm_80 while they fit in shared memory)",
    )
    ap.add_argument("--B", type=int, default=4194304, help="the batch of the launch analysed")
    ap.add_argument("--L", type=int, default=4, help="blocks in the stack kernels' launch")
    ap.add_argument("--no-param-grads", action="store_true", help="backward launches without parameter gradients")
    ap.add_argument("--lanes", default="all", help="'all' (exact bank model) or e.g. 0,31 (faster)")
    ap.add_argument("--detail", type=int, default=0, help="also list the N hottest SASS instructions")
    args = ap.parse_args(argv)
    tool = load_tool(args.tool)
    dtypes, kernels = args.dtypes.split(","), args.kernels.split(",")
    cubin, log = build(tool, dtypes, kernels)
    funcs, _ = tool.disassemble(cubin)
    names, params, usage, spills = (
        tool.demangle(list(funcs)),
        tool.kparams(cubin),
        tool.res_usage(cubin),
        tool.ptxas_spills(log),
    )
    B, L, hw = args.B, args.L, dict(tool.H100)
    layout = 3 * d * D + 3 * d + D * d + D  # RowsLayout<D, d>::kSize, floats
    tile = THREADS * (2 * (D + 4) + 4 * d + 8)  # TileParamGrads' x, gy and g|z rows, floats
    lanes = list(range(32)) if args.lanes == "all" else [int(v) for v in args.lanes.split(",")]
    for dtype in dtypes:
        es = 4 if dtype == "float32" else 2
        for kernel in kernels:
            if not applies(kernel, dtype):
                continue
            want = symbol(kernel, dtype)
            sym = next(m for m, name in names.items() if want in name)
            backward = "bwd" in kernel
            grads = backward and not args.no_param_grads
            blocks_of_weights = L if kernel.startswith("stack") else 1
            smem = 4 * (blocks_of_weights * layout + (tile if grads else 0))
            if kernel == "fwd_bf16":  # Bf16Forward::kSmemWords: fragments, then four warps' scratch
                smem = 4 * (32 * 66 + 4 * (32 * (D // 2 + 4) + 32 * (D + 8) + 2 * 32 * (d // 2 + 8)))
            if kernel == "bwd_half":  # TensorCoreProjections::kSmemWords: fragments, then the tile
                smem = 4 * (32 * 174 + tile)
            if kernel == "stack_fwd_tc":  # TensorCoreStackForward::smem_bytes: L blocks' fragments, 4 warps' q|k|v
                smem = 4 * (L * (128 * 24 + 64 * 9) + 4 * 32 * (3 * d + 16))
            if kernel == "stack_bwd_tc":  # TensorCoreStackBackward::smem_bytes: L blocks' weights, then the tile
                smem = 4 * (L * (3 * d * (D + 8) + D * d + d * (D + 8) + 3 * d + D) + tile)
            regs = usage.get(sym, {}).get("REG", spills.get(sym, {}).get("regs", 0))
            occupancy = tool.occupancy(regs, THREADS, smem)
            grid = min(-(-B // THREADS), tool.H100["sms"] * occupancy["ctas_per_sm"])
            pointers = SIGNATURES[kernel][1]
            buffers = {
                n: (tool.fake_addr(i + 1), ROLES.get(n, "weight"), es if n in ("x", "y", "gy", "gx") else 4)
                for i, n in enumerate(pointers + ["wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo"])
            }

            def pack(tiles, kernel=kernel, sym=sym, buffers=buffers, grid=grid, grads=grads, pointers=pointers):
                weights = [buffers[n][0] for n in ["wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo"]]
                device_params = struct.pack("<8Qiif", *weights, D, d, d**-0.5)
                ptrs = [0 if (n == "partials" and not grads) else buffers[n][0] for n in pointers]
                tail = [("q", tiles * grid * THREADS), ("B", 1)]
                if kernel.startswith("stack"):
                    values = [("Q", p) for p in ptrs] + [("i", L), ("f", d**-0.5)] + tail
                else:
                    values = [("Q", p) for p in ptrs] + [("S", device_params)] + tail
                layout_of = params[sym]
                buf = bytearray(max(o + s for o, s in layout_of.values()))
                for ordinal, (fmt, value) in enumerate(values):
                    offset, _ = layout_of[ordinal]
                    if fmt == "S":
                        buf[offset : offset + len(value)] = value
                    else:
                        struct.pack_into("<" + fmt, buf, offset, value)
                return bytes(buf)

            spill = spills.get(sym, {})
            spec = tool.KernelSpec(
                name=f"cuda rows {kernel} {dtype}" + ("" if grads or not backward else " (gx only)"),
                fn_sass=funcs[sym], threads=THREADS, grid=grid, params=pack, grid_emu=lambda t, g=grid: g,
                samples_per_tile=THREADS, persistent=True, tiles_real=-(-B // THREADS), buffers=buffers,
                dram_bytes_per_sample=(3 if backward else 2) * D * es, B=B,
                bench=("cuda", "bwd" if backward else "fwd", dtype),
                config=f"{THREADS} threads, grid {grid}, shared {smem} B" + (f", L={L}" * kernel.startswith("stack")),
                resources=dict(regs=regs, spill_st=spill.get("spill_st"), spill_ld=spill.get("spill_ld"),
                               stack=spill.get("stack"), local=usage.get(sym, {}).get("LOCAL"), smem=smem),
                compile_s=0, symbol=names[sym], cubin=str(cubin),
            )  # fmt: skip
            spec.occ = occupancy
            tool.report(spec, tool.analyse(spec, lanes, hw), {}, hw, detail=args.detail)


if __name__ == "__main__":
    main()
