"""Time deris's Triton kernels against their PyTorch references.

Operations: MSDA (plain entry, and the fused entry that takes raw offsets and logits) and mask
pooling, each forward only and forward + backward, in float32 / float16 / bfloat16.

DeRIS shapes: the pixel decoder's encoder self-attention over 3 levels (input / 32, / 16, / 8)
of a square 384 / 512 / 768 / 1024 px input, 8 heads x 32 dims, 4 points, Q = S; mask pooling of
20 masks over 256 channels at input / 4. Batch 1, 8 and 32.

Method (CUDA): every number is the median over --iters timed calls (CUDA events) after --warmup
untimed ones; successive calls read different copies of the inputs, enough copies to exceed
twice the L2 cache, so inputs do not stay in L2 between calls. Bandwidth is the compulsory
traffic (every input read once, every output written once; for forward + backward also the
backward's inputs and every gradient, in the tensors' dtypes) divided by the time, next to the
device's copy bandwidth (a large tensor copy, read + write).

--quick runs a tiny shape on CPU in a few seconds: the references, plus the Triton kernels when
TRITON_INTERPRET=1 is set (Triton's interpreter, far slower than compiled code: a smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import deris.kernels as kernels
from deris.atomic import atomic_write
from deris.kernels._triton_support import INTERPRETING, TRITON_AVAILABLE, triton

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LEVEL_STRIDES = (32, 16, 8)
MASKS, MASK_CHANNELS = 20, 256


@dataclass
class Shape:
    batch: int
    pixels: int  # square input size
    heads: int = 8
    head_dim: int = 32
    points: int = 4

    @property
    def levels(self) -> list[tuple[int, int]]:
        return [(self.pixels // stride, self.pixels // stride) for stride in LEVEL_STRIDES]

    @property
    def keys(self) -> int:
        return sum(h * w for h, w in self.levels)


@dataclass
class Case:
    """One operation at one shape: the argument copies and which of them get gradients."""
    op: str
    shape: Shape
    dtype: torch.dtype
    args: list[tuple]  # one tuple per input copy
    grad_positions: tuple[int, ...]
    reference: Callable
    triton: Callable
    queries: int
    out_shape: tuple[int, ...]


def msda_case(shape: Shape, dtype: torch.dtype, device: torch.device, copies: int, fused: bool) -> Case:
    b, q, h, d, p, lv = shape.batch, shape.keys, shape.heads, shape.head_dim, shape.points, len(shape.levels)
    starts = torch.tensor([0] + [hh * ww for hh, ww in shape.levels], device=device).cumsum(0)[:-1]

    def one_copy() -> tuple:
        value = torch.randn(b, shape.keys, h, d, device=device, dtype=dtype)
        if fused:
            reference_points = torch.rand(b, q, lv, 2, device=device, dtype=dtype)
            offsets = 2 * torch.randn(b, q, h, lv, p, 2, device=device, dtype=dtype)
            logits = torch.randn(b, q, h, lv * p, device=device, dtype=dtype)
            return value, shape.levels, starts, reference_points, offsets, logits
        locations = torch.rand(b, q, h, lv, p, 2, device=device, dtype=dtype)
        weights = torch.randn(b, q, h, lv * p, device=device).softmax(-1).view(b, q, h, lv, p).to(dtype)
        return value, shape.levels, starts, locations, weights

    if fused:
        return Case("msda_fused", shape, dtype, [one_copy() for _ in range(copies)], (0, 3, 4, 5),
                    kernels.ms_deform_attn_fused_reference, kernels.ms_deform_attn_fused_triton, q, (b, q, h * d))
    return Case("msda", shape, dtype, [one_copy() for _ in range(copies)], (0, 3, 4),
                kernels.ms_deform_attn_reference, kernels.ms_deform_attn_triton, q, (b, q, h * d))


def mask_pool_case(shape: Shape, dtype: torch.dtype, device: torch.device, copies: int) -> Case:
    size = shape.pixels // 4

    def one_copy() -> tuple:
        return (torch.randn(shape.batch, MASKS, size, size, device=device, dtype=dtype),
                torch.randn(shape.batch, MASK_CHANNELS, size, size, device=device, dtype=dtype))

    return Case("mask_pool", shape, dtype, [one_copy() for _ in range(copies)], (0, 1),
                kernels.mask_pool_reference, kernels.mask_pool_triton, MASKS, (shape.batch, MASKS, MASK_CHANNELS))


def build_case(op: str, shape: Shape, dtype: torch.dtype, device: torch.device, copies: int) -> Case:
    if op == "mask_pool":
        return mask_pool_case(shape, dtype, device, copies)
    return msda_case(shape, dtype, device, copies, fused=op == "msda_fused")


@dataclass
class Row:
    op: str
    passes: str  # "fwd" or "fwd+bwd"
    dtype: str
    batch: int
    pixels: int
    queries: int
    bytes: int
    torch_ms: float | str | None = None  # milliseconds, "OOM", or None when not run
    triton_ms: float | str | None = None


def tensors_bytes(items) -> int:
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


def traffic(case: Case, backward: bool) -> int:
    """Compulsory bytes: inputs read and output written; backward adds grad_out and the inputs
    read again, and every gradient written."""
    inputs = tensors_bytes(case.args[0])
    out = math.prod(case.out_shape) * case.dtype.itemsize
    moved = inputs + out
    if backward:
        grads = tensors_bytes([case.args[0][i] for i in case.grad_positions])
        moved += inputs + out + grads
    return moved


def copies_needed(case_bytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(32, math.ceil(2 * l2 / max(case_bytes, 1)) + 1))


def median_ms(fn: Callable[[tuple], object], args: list[tuple], warmup: int, iters: int,
              device: torch.device) -> float:
    for i in range(warmup):
        fn(args[i % len(args)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(args[i % len(args)])
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for i in range(iters):
        began = time.perf_counter()
        fn(args[i % len(args)])
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, warmup: int, iters: int) -> float:
    """Read + write bandwidth of a plain device copy of a tensor much larger than any cache."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), [()], warmup, iters, device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def runner(op: Callable, case: Case, backward: bool) -> Callable[[tuple], object]:
    if not backward:
        def forward(args: tuple):
            with torch.no_grad():
                return op(*args)
        return forward

    def forward_backward(args: tuple):
        inputs = [args[i] for i in case.grad_positions]
        out = op(*args[:-1])
        return torch.autograd.grad(out, inputs, args[-1])
    return forward_backward


def time_op(op: Callable, case: Case, args: list[tuple], backward: bool, warmup: int, iters: int,
            device: torch.device) -> float | str:
    try:
        return median_ms(runner(op, case, backward), args, warmup, iters, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def time_case(case: Case, backward: bool, use_triton: bool, warmup: int, iters: int,
              device: torch.device) -> Row:
    args = case.args
    if backward:
        for copy in args:
            for i in case.grad_positions:
                copy[i].requires_grad_(True)
        args = [copy + (torch.randn(case.out_shape, device=device, dtype=case.dtype),) for copy in args]
    row = Row(case.op, "fwd+bwd" if backward else "fwd", str(case.dtype).removeprefix("torch."),
              case.shape.batch, case.shape.pixels, case.queries, traffic(case, backward))
    row.torch_ms = time_op(case.reference, case, args, backward, warmup, iters, device)
    if use_triton:
        row.triton_ms = time_op(case.triton, case, args, backward, warmup, iters, device)
    return row


def format_table(rows: list[Row], copy_gbs: float) -> str:
    header = ["op", "pass", "dtype", "batch", "input px", "Q", "torch ms", "triton ms", "speedup",
              "triton GB/s", "% of copy BW"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.op, r.passes, r.dtype, r.batch, r.pixels, r.queries,
                 f"{r.torch_ms:.3f}" if isinstance(r.torch_ms, float) else (r.torch_ms or "-"),
                 f"{r.triton_ms:.3f}" if isinstance(r.triton_ms, float) else (r.triton_ms or "-")]
        if isinstance(r.triton_ms, float):
            gbs = r.bytes / (r.triton_ms * 1e-3) / 1e9
            speedup = f"{r.torch_ms / r.triton_ms:.2f}x" if isinstance(r.torch_ms, float) else "-"
            cells += [speedup, f"{gbs:.1f}", f"{100 * gbs / copy_gbs:.0f}%"]
        else:
            cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny shape on CPU, a few seconds; Triton only under TRITON_INTERPRET=1 "
                             "(ignores --sizes, --batches, --dtypes, --warmup, --iters)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 512, 768, 1024],
                        help="square input sizes in pixels (default: 384 512 768 1024)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default: 1 8 32)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "fp16", "bf16"],
                        help="storage dtypes (default: all)")
    parser.add_argument("--ops", nargs="+", choices=["msda", "msda_fused", "mask_pool"],
                        default=["msda", "msda_fused", "mask_pool"], help="operations (default: all)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before timing (default: 10)")
    parser.add_argument("--iters", type=int, default=50, help="timed calls; the median is reported (default: 50)")
    parser.add_argument("--out", help="also write the results as a markdown file here (default: print only)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        device = torch.device("cpu")
        shapes = [Shape(batch=1, pixels=32, heads=1, head_dim=16)]
        dtypes = [torch.float32]
        warmup, iters = 1, 2
        use_triton = TRITON_AVAILABLE and INTERPRETING
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --quick for the CPU smoke test", file=sys.stderr)
            return 2
        if not TRITON_AVAILABLE:
            print("triton is not installed", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        shapes = [Shape(batch=b, pixels=px) for px in args.sizes for b in args.batches]
        dtypes = [DTYPES[name] for name in args.dtypes]
        warmup, iters = args.warmup, args.iters
        use_triton = True

    copy_gbs = copy_bandwidth_gbs(device, warmup, iters)
    # Progress on stderr, one row per timing; the report goes to stdout at the end.
    print(format_table([], copy_gbs), file=sys.stderr, flush=True)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for op in args.ops:
                try:
                    # One copy first: its size says how many copies keep the inputs out of L2.
                    case = build_case(op, shape, dtype, device, 1)
                    extra = copies_needed(tensors_bytes(case.args[0]), device) - 1
                    if extra:
                        case.args += build_case(op, shape, dtype, device, extra).args
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"skipped {op} {dtype} batch {shape.batch} at {shape.pixels} px: inputs do not fit",
                          file=sys.stderr)
                    continue
                for backward in (False, True):
                    row = time_case(case, backward, use_triton, warmup, iters, device)
                    rows.append(row)
                    print(format_table([row], copy_gbs).splitlines()[-1], file=sys.stderr, flush=True)
                del case
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if device.type == "cpu" and use_triton:
        device_name += " (Triton interpreter)"
    triton_version = triton.__version__ if TRITON_AVAILABLE else "not installed"
    report = "\n".join([
        "# deris kernel benchmark",
        "",
        f"- device: {device_name}",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, triton {triton_version}",
        f"- copy bandwidth (read + write): {copy_gbs:.0f} GB/s",
        f"- median of {iters} calls after {warmup} warm-up calls",
        "",
        format_table(rows, copy_gbs),
        "",
    ])
    print(report)
    if args.out:
        atomic_write(args.out, report.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
