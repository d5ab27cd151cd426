"""Static report of deris's Triton kernels compiled for a GPU architecture: no GPU needed.

Every kernel is compiled at the launch configuration the launchers choose for a GPU, at DeRIS's
shapes (see deris.kernels.aot), with Triton's bundled ptxas; cuobjdump reads the machine code.
Per kernel and storage dtype the report lists:

  registers        per thread (255 is the limit; fewer means more programs per SM)
  spills           local-memory loads and stores (LDL / STL) and the stack frame; 0 is the goal
  shared           shared memory per program in bytes
  SASS             instructions in the compiled code
  LDG bits         global loads by width per thread: 16 or 32 bits are scalar gathers; 64 and 128
                   bits are vector loads (128 = 16 bytes, the widest)
  loops            loops left in the code (constant ones are unrolled)

For the MSDA forward kernels it also counts the warp-instructions issued per (query, head) pair:
the SASS one warp runs, each loop times its trip count, times the warps of a program, divided by
the queries a program covers. A GPU issues at most one warp-instruction per scheduler per cycle
(four per SM), so pairs x that count / (SMs x 4 x boost clock) is the time below which the kernel
cannot run however fast memory is: the issue-bound estimate, given per MSDA call (one encoder
layer; DeRIS runs 6) at batch 1, for the architecture's reference GPU. Beside it, the L1 bound:
the 32-byte sectors the value gathers touch, at four per cycle per SM. The fixed launch
configurations fill the tables; the autotuning space of the forward gets a table of its own.

    python benchmarks/kernels_static.py --arch sm_90 --out benchmarks/results/kernels_static_sm90.md

Takes a minute or two of CPU (Triton caches the compiled kernels for the next run).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import deris.kernels.aot as aot
from deris.atomic import atomic_write
from deris.kernels._triton_support import INTERPRETING, TRITON_AVAILABLE, triton
from deris.kernels.aot import Instruction

ROOT = Path(__file__).resolve().parents[1]
# Meta-parameters that restate the problem's shape rather than choose a launch configuration.
SHAPE_PARAMETERS = {"NUM_HEADS", "HEAD_DIM", "NUM_LEVELS", "NUM_POINTS", "VALUE_GRAD", "NARROW"}

# Instruction classes for the breakdown of the MSDA forward (by SASS opcode, modifiers dropped).
CLASSES = {
    "global memory": {"LDG", "STG", "RED", "ATOM"},
    "fp32 arithmetic": {"FFMA", "FMUL", "FADD", "FMNMX", "FRND", "FSEL", "FSETP", "MUFU"},
    "conversions": {"F2I", "I2F", "I2FP", "F2F", "F2FP", "HADD2", "HMUL2", "HFMA2", "PRMT"},
    "integer, address, predicate, moves": {"IMAD", "IADD3", "LEA", "ISETP", "LOP3", "SHF", "SEL", "SGXT", "IABS",
                                           "PLOP3", "P2R", "R2P", "USHF", "UIADD3", "UIMAD", "ULEA", "ULOP3", "CS2R",
                                           "MOV"},
}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} (with uncommitted changes)" if dirty else commit


def instruction_classes(sass: Sequence[Instruction]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for instruction in sass:
        opcode = instruction.opcode.split(".")[0]
        name = next((name for name, opcodes in CLASSES.items() if opcode in opcodes), "other")
        counts[name] += 1
    return dict(counts)


FORWARD_KERNELS = ("_msda_forward_kernel", "_msda_fused_forward_kernel")
BACKWARD_KERNELS = ("_msda_backward_kernel", "_msda_fused_backward_kernel")


def launch_config(compiled: aot.CompiledLaunch) -> str:
    blocks = ", ".join(f"{name}={value}" for name, value in compiled.config.items()
                       if name not in SHAPE_PARAMETERS and not name.startswith("num_"))
    return f"{blocks}, {compiled.config['num_warps']} warps"


def load_widths(compiled: aot.CompiledLaunch) -> str:
    return ", ".join(f"{bits}b x {count}" for bits, count in compiled.global_load_widths.items())


def gathered_sectors(compiled: aot.CompiledLaunch) -> int:
    """32-byte L1 sectors the value gathers of one (query, head) touch: each corner reads the head's
    channels, one aligned run (heads start at multiples of HEAD_DIM elements)."""
    config = compiled.config
    row_bytes = config["HEAD_DIM"] * aot.DTYPES[compiled.dtype].itemsize
    return config["NUM_LEVELS"] * config["NUM_POINTS"] * 4 * -(-row_bytes // 32)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["sm_80", "sm_90"], default="sm_90",
                        help="GPU architecture to compile for (default: sm_90; sm_80 = A100, sm_90 = H100/H200)")
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "fp16", "bf16"], default=["fp32", "fp16", "bf16"],
                        help="storage dtypes (default: all three)")
    parser.add_argument("--out", type=Path, help="also write the report here as markdown (default: print only)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not TRITON_AVAILABLE:
        print("triton is not installed", file=sys.stderr)
        return 2
    if INTERPRETING:
        print("TRITON_INTERPRET is set: the kernels would be defined for the interpreter; unset it", file=sys.stderr)
        return 2
    arch = aot.ARCHS[args.arch]

    kernel_rows, forward_rows, tuning_rows = [], [], []
    per_pair_1024: dict[tuple[str, str], float] = {}
    sectors_1024: dict[tuple[str, str], int] = {}
    seen, seen_launches = set(), set()
    for compiled, sass in aot.compile_all([arch], args.dtypes):
        print(f"compiled {compiled.dtype} {compiled.resolution} px {compiled.kernel}", file=sys.stderr, flush=True)
        # A launcher records its fixed configuration first, then the rest of its autotuning space.
        fixed = (compiled.kernel, compiled.dtype, compiled.resolution) not in seen_launches
        seen_launches.add((compiled.kernel, compiled.dtype, compiled.resolution))
        if (compiled.kernel, compiled.dtype) not in seen:  # one row per kernel and dtype: shapes share the code
            seen.add((compiled.kernel, compiled.dtype))
            kernel_rows.append(
                f"| {compiled.kernel} | {compiled.dtype} | {launch_config(compiled)} "
                f"| {compiled.registers} | {compiled.spill_instructions} / {compiled.stack} B | {compiled.shared} "
                f"| {compiled.sass_instructions} | {load_widths(compiled)} | {compiled.loops} |")
        if compiled.kernel not in FORWARD_KERNELS + BACKWARD_KERNELS:
            continue
        # The MSDA kernels unroll their level and point loops: straight-line code, no trip counts
        # (issued_per_warp refuses code with loops it is given no counts for).
        per_pair = compiled.config["num_warps"] * aot.issued_per_warp(sass, []) / compiled.config["BLOCK_Q"]
        if compiled.kernel in BACKWARD_KERNELS:
            if compiled.resolution == 1024:
                per_pair_1024[compiled.kernel, compiled.dtype] = per_pair
            continue
        if not fixed:
            if compiled.resolution == 1024:
                tuning_rows.append(f"| {compiled.kernel} | {compiled.dtype} | {launch_config(compiled)} "
                                   f"| {compiled.registers} | {compiled.spill_instructions} | {per_pair:.1f} |")
            continue
        sectors = gathered_sectors(compiled)
        pairs = sum(h * w for h, w in aot.msda_levels(compiled.resolution)) * aot.HEADS
        issue_us, l1_us = (pairs * count / arch.warp_instructions_per_second * 1e6 for count in (per_pair, sectors))
        classes = instruction_classes(sass)
        breakdown = ", ".join(f"{name} {compiled.config['num_warps'] * count / compiled.config['BLOCK_Q']:.0f}"
                              for name, count in sorted(classes.items(), key=lambda item: -item[1]))
        forward_rows.append(f"| {compiled.kernel} | {compiled.dtype} | {compiled.resolution} | {pairs} "
                            f"| {per_pair:.1f} | {sectors} | {issue_us:.1f} | {l1_us:.1f} "
                            f"| {'issue' if issue_us >= l1_us else 'L1'} | {breakdown} |")
        if compiled.resolution == 1024:
            per_pair_1024[compiled.kernel, compiled.dtype] = per_pair
            sectors_1024[compiled.kernel, compiled.dtype] = sectors

    # The headline: the plain forward in fp16 at 1024 px, then every forward kernel and dtype.
    summary = []
    if ("_msda_forward_kernel", "fp16") in per_pair_1024:
        summary += [f"msda forward fp16 1024px {arch.name}: {per_pair_1024['_msda_forward_kernel', 'fp16']:.1f} "
                    "warp-instructions per (query, head)", ""]
    summary += ["| warp-instructions per (query, head) at 1024 px | " + " | ".join(args.dtypes) + " |",
                "|---|" + "---|" * len(args.dtypes)]
    for kernel in FORWARD_KERNELS + BACKWARD_KERNELS:
        summary.append(f"| {kernel} | " + " | ".join(f"{per_pair_1024[kernel, dtype]:.1f}" for dtype in args.dtypes)
                       + " |")
    summary.append("\nThe pixel decoder runs the fused kernels (softmax and location arithmetic inside). The "
                   "backward kernels run the forward's sampling code backwards in the same one-lane-per-query "
                   "layout, adding the value gradient with 16-byte float32 vector atomics (fixed configuration, "
                   "chunks of 4 channels).")
    summary.append(
        "\nWhere the count comes from: each lane owns one query, so the per-(query, point) coordinate and address "
        "work is done once; the two neighbours along an axis are found by clamping the lower one into the level "
        "and weighting both with tent functions (zero for a neighbour outside), so no corner needs a bounds test, "
        "a select or its own address (the right neighbour is an immediate offset). What remains is, per bilinear "
        "corner and channel, one conversion of the stored value to fp32 and one fp32 FMA (sm_90 has no "
        "mixed-precision FMA): 96 of the fp16 count, which fp32 storage does without conversions. Accumulating in "
        "fp16 would drop them but break the one-final-rounding accuracy the tests hold (the tolerances are not "
        "widened)."
    )
    if {"fp16", "fp32"} <= set(args.dtypes):
        bounds = {dtype: max(per_pair_1024["_msda_forward_kernel", dtype], sectors_1024["_msda_forward_kernel", dtype])
                  for dtype in ("fp16", "fp32")}
        summary.append(
            "\nfp16 against fp32: a GPU's L1 returns at most 128 bytes (four 32-byte sectors) per cycle per SM, as "
            "many sectors as its four schedulers issue warp-instructions, so the sectors the gathers touch per "
            "(query, head) compare directly with the warp-instructions: a kernel runs no faster than the larger "
            f"of the two. At 1024 px the fp16 forward's bound is {bounds['fp16']:.0f} "
            f"({sectors_1024['_msda_forward_kernel', 'fp16']} sectors), the fp32 one's {bounds['fp32']:.0f} "
            f"({sectors_1024['_msda_forward_kernel', 'fp32']} sectors): fp16 is estimated "
            f"{bounds['fp32'] / bounds['fp16']:.2f}x faster. An estimate from the machine code and the bytes "
            "read, not a measurement (no GPU was used); the table below gives both bounds for every kernel.")

    # Mask pooling: a matrix product over the grid cells, far below the ridge point.
    cells = (aot.MASK_SIZE // 4) ** 2
    flops = 2 * aot.MASKS * aot.MASK_CHANNELS * cells
    mega_bytes = (aot.MASK_CHANNELS + aot.MASKS) * aot.MASK_SIZE ** 2 * 2 / 1e6
    compute_us = flops / (arch.multiprocessors * arch.fp32_lanes_per_sm * 2 * arch.boost_ghz * 1e9) * 1e6
    summary.append(
        f"\nMask pooling at DeRIS's shapes ({aot.MASKS} masks, {aot.MASK_CHANNELS} channels, {aot.MASK_SIZE}x"
        f"{aot.MASK_SIZE} pixels, {cells} grid cells) is a {flops / 1e6:.1f} MFLOP matrix product over "
        f"{mega_bytes:.1f} MB of half-precision inputs: on the {arch.example} the fp32 FMA units need "
        f"{compute_us:.2f} us, DRAM {mega_bytes / arch.memory_tb_s:.2f} us, so the kernel is bound by memory "
        "and tensor cores would not make it faster. fp32-exact tensor-core products (tl.dot's tf32x3) were "
        "tried: at 32 x 64 x 32 tiles they spill, at the 32 x 64 x 16 tiles used they compile but issue more "
        "instructions per loop step than the FMA product (about 1000 against 880 in fp32, 1190 against 1000 in "
        "fp16: the operand splits and layout conversions outweigh it). What counts is how it reads: each cell's 4x4 feature "
        "pixels as 4 vector loads of 4 contiguous pixels (the LDG widths below), and at batch 1 the grid "
        "cells split over enough programs to fill the GPU (partial sums added by the launcher).")

    report = "\n".join([
        f"# deris Triton kernels compiled for {arch.name}: static report",
        "",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- triton {triton.__version__}, torch {torch.__version__}, git commit {git_commit()}",
        f"- target: GPUTarget('cuda', {arch.capability}, 32), Triton's bundled ptxas; no GPU used",
        "- shapes: MSDA 3 levels (384 px: 12x12, 24x24, 48x48; 1024 px: 32x32, 64x64, 128x128), 8 heads of 32, "
        "4 points, queries = keys, batch 1; mask pooling N=20, C=256, 96x96",
        f"- issue-bound estimates for {arch.example}: {arch.multiprocessors} SMs x 4 schedulers x "
        f"{arch.boost_ghz} GHz = {arch.warp_instructions_per_second / 1e12:.3f} T warp-instructions/s",
        "- regenerate: `python benchmarks/kernels_static.py --arch "
        f"{arch.name} --out benchmarks/results/kernels_static_{arch.name.replace('_', '')}.md`",
        "",
        "## Summary",
        "",
        *summary,
        "",
        "## Kernels",
        "",
        "| kernel | dtype | launch config | registers | spills (LDL/STL) / stack | shared B | SASS | LDG bits x count "
        "| loops |",
        "|---|---|---|---|---|---|---|---|---|",
        *kernel_rows,
        "",
        "## MSDA forward: warp-instructions and L1 sectors per (query, head), and the bounds per call",
        "",
        "Counted from the SASS: one warp runs the whole (straight-line, loops x trip count) code; a program "
        "has num_warps warps and covers BLOCK_Q queries of one head. L1 sectors: the 32-byte sectors the "
        "value gathers touch (levels x points x 4 corners x the head's channels). Bounds per MSDA call (one "
        "encoder layer; DeRIS runs 6) at batch 1; the larger one limits. Breakdown by instruction class, per "
        "(query, head). Fixed launch configurations (autotuning off).",
        "",
        "| kernel | dtype | input px | (query, head) pairs | warp-instructions per pair | L1 sectors per pair "
        "| issue-bound us | L1-bound us | bound | breakdown |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *forward_rows,
        "",
        "## MSDA forward: the autotuning space",
        "",
        "Autotuning (on a GPU unless DERIS_AUTOTUNE=0) also tries these program sizes, once per dtype, head size "
        "and power-of-two bucket of the query count; each is compiled and checked for spills by "
        "tests/test_kernels_compile.py. Same per-lane code, so nearly the same count per pair (1024 px).",
        "",
        "| kernel | dtype | launch config | registers | spills | warp-instructions per pair |",
        "|---|---|---|---|---|---|",
        *tuning_rows,
        "",
    ])
    print(report)
    if args.out:
        atomic_write(args.out, report.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
