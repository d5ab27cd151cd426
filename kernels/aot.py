"""Compile every Triton kernel of this package ahead of time for an NVIDIA GPU, without a GPU.

How: the custom operators' bodies run forward and backward on meta tensors of DeRIS's shapes inside
:func:`planning_only`, so each launch they would make is recorded with its grid, arguments and
meta-parameters (block sizes, ``num_warps``) instead of running. Each is then specialised by the
binder a real launch uses (16-byte alignment, divisibility of integers by 16: meta tensors sit at
address 0, like the aligned buffers of PyTorch's allocator) and compiled by ``triton.compile`` for
``GPUTarget("cuda", capability, 32)``. Triton's wheel bundles ``ptxas`` and ``cuobjdump``, which
give the machine code (SASS) and its resources; no CUDA driver or toolkit is needed.

The process must define the kernels for a GPU: run it with ``TRITON_INTERPRET`` unset (under the
interpreter the launchers would also pick the interpreter's block sizes).

    python -m deris.kernels.aot --arch sm_80 sm_90 --json compiled.json

tests/test_kernels_compile.py runs it in CI; benchmarks/kernels_static.py turns it into a report.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _triton_support
from .mask_pool import _mask_pool_backward, _mask_pool_forward
from .ms_deform_attn import _msda_backward, _msda_forward, _msda_fused_backward, _msda_fused_forward

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class GpuArch:
    """A compile target, and the issue rate of a typical GPU of it (for the static report)."""

    name: str
    capability: int
    example: str
    multiprocessors: int
    boost_ghz: float
    fp32_lanes_per_sm: int  # fp32 FMAs per cycle per SM
    memory_tb_s: float  # DRAM bandwidth of the example GPU

    @property
    def warp_instructions_per_second(self) -> float:
        # Four warp schedulers per SM, each issuing at most one warp-instruction per cycle.
        return self.multiprocessors * 4 * self.boost_ghz * 1e9


ARCHS = {
    "sm_80": GpuArch("sm_80", 80, "A100 SXM", 108, 1.41, 64, 2.04),
    "sm_90": GpuArch("sm_90", 90, "H100 / H200 SXM", 132, 1.98, 128, 3.35),
}

# DeRIS's shapes: the pixel decoder's encoder attends over 3 levels (input / 32, / 16, / 8) with 8
# heads of 32 channels and 4 points, queries = keys; mask pooling of 20 masks over 256 channels at
# input / 4 of a 384-px image.
RESOLUTIONS = (384, 1024)
HEADS, HEAD_DIM, POINTS = 8, 32, 4
LEVEL_STRIDES = (32, 16, 8)
MASKS, MASK_CHANNELS, MASK_SIZE = 20, 256, 96


def msda_levels(resolution: int) -> list[tuple[int, int]]:
    return [(resolution // stride, resolution // stride) for stride in LEVEL_STRIDES]


@dataclass(frozen=True)
class PlannedLaunch:
    op: str  # "msda", "msda_fused" or "mask_pool"
    dtype: str
    resolution: int
    launch: _triton_support.Launch

    @property
    def kernel_name(self) -> str:
        return self.launch.kernel.fn.__name__


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def plan_launches(dtype_name: str, arch: GpuArch) -> list[PlannedLaunch]:
    """Every launch the operators' bodies make, forward and backward (every gradient asked for), at
    DeRIS's shapes in ``dtype_name``. The bodies are called directly: through the operators, meta
    tensors would reach the fake implementations, which launch nothing."""
    dtype = DTYPES[dtype_name]
    planned: list[PlannedLaunch] = []

    def record_as(op: str, resolution: int) -> Any:
        return lambda launch: planned.append(PlannedLaunch(op, dtype_name, resolution, launch))

    for resolution in RESOLUTIONS:
        shapes = [size for shape in msda_levels(resolution) for size in shape]
        keys = queries = sum(h * w for h, w in msda_levels(resolution))
        levels = len(LEVEL_STRIDES)
        value = _meta(1, keys, HEADS, HEAD_DIM, dtype=dtype)
        grad_out = _meta(1, queries, HEADS * HEAD_DIM, dtype=dtype)
        with _triton_support.planning_only(record_as("msda", resolution), arch.multiprocessors):
            sampling = (_meta(1, queries, HEADS, levels, POINTS, 2, dtype=dtype),
                        _meta(1, queries, HEADS, levels, POINTS, dtype=dtype))
            _msda_forward(value, shapes, *sampling)
            _msda_backward(value, shapes, *sampling, grad_out, True)
        with _triton_support.planning_only(record_as("msda_fused", resolution), arch.multiprocessors):
            # The pixel decoder passes float32 reference points whatever the model's precision.
            reference_points = _meta(1, queries, levels, 2, dtype=torch.float32)
            offsets = _meta(1, queries, HEADS, levels, POINTS, 2, dtype=dtype)
            logits = _meta(1, queries, HEADS, levels * POINTS, dtype=dtype)
            _msda_fused_forward(value, shapes, reference_points, offsets, logits)
            _msda_fused_backward(value, shapes, reference_points, offsets, logits, grad_out, True, True)
    with _triton_support.planning_only(record_as("mask_pool", 384), arch.multiprocessors):
        masks = _meta(1, MASKS, MASK_SIZE, MASK_SIZE, dtype=dtype)
        features = _meta(1, MASK_CHANNELS, MASK_SIZE, MASK_SIZE, dtype=dtype)
        _mask_pool_forward(masks, features)
        _mask_pool_backward(masks, features, _meta(1, MASKS, MASK_CHANNELS, dtype=dtype), True, True)
    return planned


# ---------------------------------------------------------------------------------------------
# Compiling and reading the machine code
# ---------------------------------------------------------------------------------------------

_BIN = None if _triton_support.triton is None else Path(_triton_support.triton.__file__).parent / "backends/nvidia/bin"


def compile_launch(launch: _triton_support.Launch, arch: GpuArch) -> Any:
    """``triton.compile`` of one recorded launch for ``arch``, specialised as a real launch would be."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    # What JITFunction.run does before compiling (Triton 3.7), with the target fixed instead of
    # asked from the driver.
    kwargs = dict(launch.meta, debug=bool(kernel.debug or knobs.runtime.debug),
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return _triton_support.triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    assert _BIN is not None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([str(_BIN / "cuobjdump"), *flags, file.name], check=True, capture_output=True,
                              text=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and stack, local and static shared bytes, as the cubin declares them."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"]),
            "static_shared": int(found["SHARED"])}


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str  # with modifiers, e.g. "LDG.E.64"
    operands: str

    @property
    def branch_target(self) -> int | None:
        if self.opcode.split(".")[0] != "BRA":
            return None
        target = re.search(r"0x([0-9a-f]+)", self.operands)
        return int(target.group(1), 16) if target else None


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def disassemble(cubin: bytes) -> list[Instruction]:
    """The SASS of a one-kernel cubin, without the padding after the code (NOPs, the final self-branch)."""
    instructions = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        match = _SASS_LINE.match(line)
        if match:
            address, predicate, opcode, operands = match.groups()
            instructions.append(Instruction(int(address, 16), (predicate or "").strip(), opcode, operands.strip()))
    return [i for i in instructions if i.opcode != "NOP" and i.branch_target != i.address]


def loops(instructions: Sequence[Instruction]) -> list[tuple[int, int]]:
    """(first, last) address of every loop: a branch back to an earlier address closes one."""
    return [(i.branch_target, i.address) for i in instructions
            if i.branch_target is not None and i.branch_target < i.address]


def issued_per_warp(instructions: Sequence[Instruction], trip_counts: Sequence[int]) -> int:
    """Warp-instructions one warp issues running the code once, each loop ``trip_counts[k]`` times
    (loops in address order; a nested loop multiplies with its enclosing ones).

    Predicated-off instructions still issue, so they count; forward branches are assumed taken
    nowhere (both sides of an if count), exact for the straight-line code of unrolled kernels.
    """
    found = loops(instructions)
    if len(found) != len(trip_counts):
        raise ValueError(f"the code has {len(found)} loops, {len(trip_counts)} trip counts given")
    total = 0
    for instruction in instructions:
        times = 1
        for (first, last), trips in zip(found, trip_counts):
            if first <= instruction.address <= last:
                times *= trips
        total += times
    return total


def global_load_widths(instructions: Sequence[Instruction]) -> dict[int, int]:
    """{bits per thread: count} of the global loads (LDG) in the code."""
    widths: collections.Counter[int] = collections.Counter()
    for instruction in instructions:
        parts = instruction.opcode.split(".")
        if parts[0] != "LDG":
            continue
        bits = 32
        for part in parts[1:]:
            if part in ("64", "128"):
                bits = int(part)
            elif part in ("U8", "S8"):
                bits = 8
            elif part in ("U16", "S16"):
                bits = 16
        widths[bits] += 1
    return dict(sorted(widths.items()))


@dataclass
class CompiledLaunch:
    """One planned launch compiled for one architecture, and what its machine code shows."""

    op: str
    kernel: str
    dtype: str
    resolution: int
    arch: str
    grid: list[int]
    config: dict[str, Any]  # constexpr meta-parameters and num_warps, as the launcher chose them
    registers: int
    stack: int
    local: int
    shared: int  # bytes of shared memory per program, static and dynamic
    spill_instructions: int  # local-memory loads and stores (LDL / STL): spills or stack arrays
    sass_instructions: int
    loops: int
    global_load_widths: dict[int, int] = field(default_factory=dict)


def compile_all(archs: Sequence[GpuArch], dtypes: Sequence[str]) -> Iterator[tuple[CompiledLaunch, list[Instruction]]]:
    """Compile every planned launch for every architecture (each distinct specialisation once)."""
    if _triton_support.INTERPRETING:
        raise RuntimeError("the kernels were defined for Triton's interpreter; run with TRITON_INTERPRET unset")
    cache: dict[tuple, tuple[dict[str, Any], list[Instruction]]] = {}
    for arch in archs:
        for dtype in dtypes:
            for planned in plan_launches(dtype, arch):
                launch = planned.launch
                compiled = compile_launch(launch, arch)
                key = (arch.name, compiled.hash)
                if key not in cache:
                    cubin = compiled.asm["cubin"]
                    cache[key] = ({**resource_usage(cubin), "shared": compiled.metadata.shared}, disassemble(cubin))
                resources, sass = cache[key]
                config = dict(launch.meta)
                config.setdefault("num_warps", compiled.metadata.num_warps)  # Triton's default when not chosen
                yield CompiledLaunch(
                    op=planned.op, kernel=planned.kernel_name, dtype=dtype, resolution=planned.resolution, arch=arch.name,
                    grid=list(launch.grid), config=config, registers=resources["registers"], stack=resources["stack"],
                    local=resources["local"], shared=resources["shared"],
                    spill_instructions=sum(i.opcode.split(".")[0] in ("LDL", "STL") for i in sass),
                    sass_instructions=len(sass), loops=len(loops(sass)), global_load_widths=global_load_widths(sass),
                ), sass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS),
                        help="GPU architectures to compile for (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES),
                        help="storage dtypes (default: fp32 fp16 bf16)")
    parser.add_argument("--json", type=Path, help="write one record per (launch, architecture) here")
    args = parser.parse_args(argv)
    records = []
    for compiled, _ in compile_all([ARCHS[name] for name in args.arch], args.dtypes):
        records.append(asdict(compiled))
        print(f"{compiled.arch} {compiled.dtype} {compiled.resolution:>4} px {compiled.kernel}: "
              f"{compiled.registers} registers, {compiled.spill_instructions} spill instructions, "
              f"{compiled.sass_instructions} SASS instructions", flush=True)
    if args.json:
        from deris.atomic import atomic_write

        atomic_write(args.json, json.dumps(records, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
