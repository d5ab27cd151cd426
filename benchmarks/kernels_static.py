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
layer; DeRIS runs 6) at batch 1, for the architecture's reference GPU.

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
from deris.kernels._triton_support import INTERPRETING, TRITON_AVAILABLE, triton
from deris.kernels.aot import Instruction

ROOT = Path(__file__).resolve().parents[1]
# Meta-parameters that restate the problem's shape rather than choose a launch configuration.
SHAPE_PARAMETERS = {"NUM_HEADS", "HEAD_DIM", "NUM_LEVELS", "NUM_POINTS", "VALUE_GRAD"}

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

    kernel_rows, forward_rows = [], []
    per_pair_1024: dict[tuple[str, str], float] = {}
    seen = set()
    for compiled, sass in aot.compile_all([arch], args.dtypes):
        print(f"compiled {compiled.dtype} {compiled.resolution} px {compiled.kernel}", file=sys.stderr, flush=True)
        if (compiled.kernel, compiled.dtype) not in seen:  # one row per kernel and dtype: shapes share the code
            seen.add((compiled.kernel, compiled.dtype))
            widths = ", ".join(f"{bits}b x {count}" for bits, count in compiled.global_load_widths.items())
            blocks = ", ".join(f"{name}={value}" for name, value in compiled.config.items()
                               if name not in SHAPE_PARAMETERS and not name.startswith("num_"))
            kernel_rows.append(
                f"| {compiled.kernel} | {compiled.dtype} | {blocks}, {compiled.config['num_warps']} warps "
                f"| {compiled.registers} | {compiled.spill_instructions} / {compiled.stack} B | {compiled.shared} "
                f"| {compiled.sass_instructions} | {widths} | {compiled.loops} |")
        if compiled.kernel not in ("_msda_forward_kernel", "_msda_fused_forward_kernel"):
            continue
        # The forward kernels unroll their level and point loops: straight-line code, no trip counts
        # (issued_per_warp refuses code with loops it is given no counts for).
        per_pair = compiled.config["num_warps"] * aot.issued_per_warp(sass, []) / compiled.config["BLOCK_Q"]
        pairs = sum(h * w for h, w in aot.msda_levels(compiled.resolution)) * aot.HEADS
        microseconds = pairs * per_pair / arch.warp_instructions_per_second * 1e6
        classes = instruction_classes(sass)
        breakdown = ", ".join(f"{name} {compiled.config['num_warps'] * count / compiled.config['BLOCK_Q']:.0f}"
                              for name, count in sorted(classes.items(), key=lambda item: -item[1]))
        forward_rows.append(f"| {compiled.kernel} | {compiled.dtype} | {compiled.resolution} | {pairs} "
                            f"| {per_pair:.1f} | {microseconds:.1f} | {breakdown} |")
        if compiled.resolution == 1024:
            per_pair_1024[compiled.kernel, compiled.dtype] = per_pair

    # The headline: the plain forward in fp16 at 1024 px, then every forward kernel and dtype.
    summary = []
    if ("_msda_forward_kernel", "fp16") in per_pair_1024:
        summary += [f"msda forward fp16 1024px {arch.name}: {per_pair_1024['_msda_forward_kernel', 'fp16']:.0f} "
                    "warp-instructions per (query, head)", ""]
    summary += ["| warp-instructions per (query, head) at 1024 px | " + " | ".join(args.dtypes) + " |",
                "|---|" + "---|" * len(args.dtypes)]
    for kernel in ("_msda_forward_kernel", "_msda_fused_forward_kernel"):
        summary.append(f"| {kernel} | " + " | ".join(f"{per_pair_1024[kernel, dtype]:.0f}" for dtype in args.dtypes)
                       + " |")
    summary.append("\nThe pixel decoder runs the fused kernel (softmax and location arithmetic inside).")
    summary.append(
        "\nWhat stands between the fp16 forward and 120 warp-instructions per (query, head), and why fp16 issues more "
        "than fp32: each lane owns one query, so the per-(query, point) coordinate, mask and address work is done once; "
        "what remains is, per bilinear corner and channel, one conversion of the stored value to fp32 and one fp32 FMA "
        "(sm_90 has no mixed-precision FMA). Those two make 96 of the fp16 count; fp32 storage needs no conversion. "
        "Accumulating in fp16 would drop the conversions but break the one-final-rounding accuracy the tests hold "
        "(the tolerances are not widened). fp16 still halves the bytes read, which is what counts at 1024 px."
    )

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
        "## MSDA forward: warp-instructions per (query, head) and the issue-bound time per call",
        "",
        "Counted from the SASS: one warp runs the whole (straight-line, loops x trip count) code; a program "
        "has num_warps warps and covers BLOCK_Q queries of one head. Breakdown by instruction class, "
        "per (query, head).",
        "",
        "| kernel | dtype | input px | (query, head) pairs | warp-instructions per pair | issue-bound us "
        "| breakdown |",
        "|---|---|---|---|---|---|---|",
        *forward_rows,
        "",
    ])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
