"""Compile report of the Triton head kernels for a GPU architecture, on a machine without one.

    python benchmarks/kernel_report.py --arch sm_90 --json report.json [--only forward,grad_x] [--candidates]

Each kernel the margin CE can launch (forward, grad_x, grad_w, grad_w_atomic; fp32, bf16 operands;
sampled rows or all rows), plus the EPL update, is compiled ahead of time with triton.compile at the
production shape D = 512 (the launch tiles do not depend on N and C_local beyond N >= the row tile:
N = 24,576 x C_local = 32,187 and N = 3,072 x C_local = 257,488 launch the same code) with the tiles
TritonMarginCE launches. ptxas -v on the PTX gives registers and spill bytes; triton's metadata the
shared memory; the PTX tells whether the Hopper tensor-core instruction (wgmma) is used. Blocks per SM
follow from sm_90's limits (65,536 registers, 228 KB shared memory with 1 KB reserved per block,
2,048 threads, 32 blocks). --candidates compiles the GPU sweep's candidate tiles
(TritonMarginCE.CANDIDATES) instead of the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ARCHS = {"sm_90": dict(capability=90, regs=65536, smem=228 * 1024, smem_block_reserved=1024, threads=2048, blocks=32)}
DIM = 512
SHAPES = ((24576, 32187), (3072, 257488))
DTYPES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "bf16_wf32": ("bf16", "fp32")}
"""dtype -> (embeddings, centers): bf16_wf32 reads fp32 centers and converts each tile to bf16 in registers."""


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers and spill bytes of the (one) kernel in `ptx`, from ptxas -v run as triton runs it (its
    ptxas for the architecture, its flags), so the numbers are those of the cubin triton would load."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    capability = ARCHS[arch]["capability"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        command = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.cubin")]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
    text = done.stderr + done.stdout
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores, loads = (int(v) for v in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text).groups())
    return {"regs": regs, "spill_stores": stores, "spill_loads": loads}


def blocks_per_sm(regs: int, smem: int, warps: int, arch: str) -> dict:
    """Resident blocks per SM by each limit (registers are allocated per warp in units of 256)."""
    lim = ARCHS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // per_warp) // warps
    by_smem = lim["smem"] // (smem + lim["smem_block_reserved"])
    by_threads = lim["threads"] // (32 * warps)
    return {"blocks_per_sm": min(by_regs, by_smem, by_threads, lim["blocks"]),
            "limit": min((by_regs, "regs"), (by_smem, "smem"), (by_threads, "threads"), (lim["blocks"], "blocks"))[1]}


def _epl_launch():
    from lvface.kernels import triton_epl as e

    signature = {"feat_ptr": "*fp32", "order_ptr": "*i64", "ends_ptr": "*i64", "sorted_ptr": "*i64",
                 "proto_ptr": "*fp32", "D": "i32", "stride_f": "i32", "stride_p": "i32", "momentum": "fp32",
                 "ADAPTIVE": "constexpr", "EPS": "constexpr", "BLOCK_D": "constexpr"}
    return e._epl_kernel, signature, {"ADAPTIVE": True, "EPS": 1e-12, "BLOCK_D": DIM}, {"num_warps": 4}


def launches(candidates: bool = False):
    """(kernel name, dtype, variant, sampled, tiles, kernel fn, signature, constexprs, options) of every
    launch TritonMarginCE makes at D = 512 (or of its sweep candidates), and the EPL update."""
    from lvface.kernels import triton_margin_ce as m

    for dtype, (x_t, w_t) in DTYPES.items():
        for sampled in (False, True):
            for launch in m.compile_launches(x_t, w_t, DIM, sampled=sampled, candidates=candidates):
                yield dict(dtype=dtype, sampled=sampled, **launch)
    fn, signature, constexprs, options = _epl_launch()
    yield dict(kernel="epl", variant="adaptive", dtype="fp32", sampled=False, fn=fn, signature=signature,
               constexprs=constexprs, options=options, tiles={"BLOCK_D": DIM})


def compile_one(launch: dict, arch: str) -> dict:
    lim = ARCHS[arch]
    began = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=launch["fn"], signature=launch["signature"], constexprs=launch["constexprs"]),
                              target=GPUTarget("cuda", lim["capability"], 32), options=launch["options"])
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(ptx, arch)
    warps = launch["options"].get("num_warps", 4)
    smem = compiled.metadata.shared
    return {
        "kernel": launch["kernel"], "dtype": launch["dtype"], "variant": launch["variant"], "sampled": launch["sampled"],
        "tiles": launch["tiles"], "num_warps": warps, "num_stages": launch["options"].get("num_stages", 3),
        **usage, "spill_bytes": usage["spill_stores"] + usage["spill_loads"], "smem": smem,
        **blocks_per_sm(usage["regs"], smem, warps, arch),
        "wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx, "compile_s": round(time.perf_counter() - began, 1),
    }


def _table(rows) -> str:
    head = ("| kernel | dtype | variant | sampled | tiles (N x C x D), warps, stages | regs | spill B (st/ld) | smem B "
            "| blocks/SM | wgmma |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        t = r["tiles"]
        tiles = (f"{t.get('BLOCK_N', '-')} x {t.get('BLOCK_C', '-')} x {t.get('BLOCK_D', '-')}, "
                 f"{r['num_warps']}w, {r['num_stages']}s")
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['variant']} | {r['sampled']} | {tiles} | {r['regs']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} | {r['blocks_per_sm']} ({r['limit']}) | "
                     f"{'yes' if r['wgmma'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=sorted(ARCHS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--only", default="", help="comma-separated kernel names (forward, grad_x, grad_w, "
                                                     "grad_w_atomic, epl); default all")
    parser.add_argument("--dtypes", default="", help="comma-separated dtypes (fp32, bf16, bf16_wf32); default all")
    parser.add_argument("--sampled", choices=("both", "yes", "no"), default="both",
                        help="the Partial-FC (sampled rows) launches, the all-rows ones, or both")
    parser.add_argument("--candidates", action="store_true", help="compile the GPU sweep's candidate tiles")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    dtypes = set(filter(None, args.dtypes.split(",")))
    rows = []
    for launch in launches(args.candidates):
        name = launch["kernel"] + ("_atomic" if launch["variant"] == "atomic" else "")
        if (only and name not in only) or (dtypes and launch["dtype"] not in dtypes):
            continue
        if args.sampled != "both" and launch["sampled"] != (args.sampled == "yes") and launch["kernel"] != "epl":
            continue
        rows.append(compile_one(launch, args.arch))
        print(json.dumps({k: v for k, v in rows[-1].items()}), file=sys.stderr, flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "dim": DIM,
                                         "shapes": SHAPES, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
