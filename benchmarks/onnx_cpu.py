"""CPU latency of the exported graphs: ONNX Runtime vs PyTorch eager, batch 1, per graph.

    python benchmarks/onnx_cpu.py --preset deris-b-grefcoco            # exports with random weights
    python benchmarks/onnx_cpu.py --preset deris-b-grefcoco --onnx-dir exports/b-384

Both sides get the same thread budget (ORT intra_op_num_threads, torch.set_num_threads) and the
same real inputs (a synthetic image pair and random token ids, each graph fed PyTorch's values
of its inputs). The report is the median of ``--repeats`` timed runs after ``--warmup`` runs,
written as markdown to ``benchmarks/results/onnx_cpu_<preset>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime
import torch

import deris
import deris.kernels as kernels
from deris.export.graphs import GRAPH_NAMES, build_graph
from deris.export.manifest import read_manifest
from deris.export.onnx_export import ExportOptions, export_onnx, load_model
from deris.export.runtime import OnnxPipeline
from deris.export.verify import reference_run, synthetic_inputs

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time (ms) of ``repeats`` runs after ``warmup`` runs. The two runtimes are timed
    in separate blocks, not alternately: both keep their worker threads spinning for a while
    after a run (ORT's intra-op pool, OpenMP), which would steal the cores from the other one."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def benchmark(
    model: deris.DeRIS, onnx_dir: Path, threads: int, warmup: int, repeats: int
) -> list[tuple[str, float, float]]:
    """(graph, PyTorch median ms, ORT median ms) for every graph of the export."""
    manifest = read_manifest(onnx_dir)
    graphs = list(manifest["graphs"])
    inputs = synthetic_inputs(model.cfg, manifest["resolution"], batch=1)
    reference = reference_run(model, inputs, manifest["resolution"], graphs)
    pipeline = OnnxPipeline(onnx_dir, threads=threads)
    torch.set_num_threads(threads)
    rows = []
    for name in graphs:
        feeds, _ = reference[name]
        module = build_graph(name, model)
        numpy_feeds = {k: v.numpy() for k, v in feeds.items()}

        def eager() -> object:
            with kernels.backend("torch"), torch.inference_mode():
                return module(*feeds.values())

        eager_ms = median_ms(eager, warmup, repeats)
        ort_ms = median_ms(lambda: pipeline.run(name, numpy_feeds), warmup, repeats)
        rows.append((name, eager_ms, ort_ms))
        print(f"{name:12s} torch {rows[-1][1]:9.1f} ms   onnxruntime {rows[-1][2]:9.1f} ms", flush=True)
    return rows


def markdown(
    rows: Sequence[tuple[str, float, float]], manifest: dict[str, Any], threads: int, warmup: int, repeats: int, load_before: float
) -> str:
    lines = [
        f"# ONNX Runtime vs PyTorch eager on CPU: {manifest['preset']}",
        "",
        f"* date: {datetime.date.today().isoformat()}",
        f"* CPU: {cpu_model()} ({os.cpu_count()} logical cores visible), {threads} threads for both runtimes; "
        f"1-minute load average {load_before:.2f} before and {os.getloadavg()[0]:.2f} after the timing (shared machine)",
        f"* versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"onnx {onnx.__version__}, numpy {np.__version__}, deris {deris.__version__}",
        f"* model: {manifest['preset']} at {manifest['resolution']}x{manifest['resolution']} (cognition at "
        f"{manifest['mini_resolution']}), L={manifest['max_text_len']}, N={manifest['num_queries']}, weights: {manifest['weights']}",
        f"* export: opset {manifest['opset']}, MSDA {manifest['msda']}, {manifest['precision']}; "
        "ORT CPUExecutionProvider with default graph optimisations",
        f"* batch 1; median of {repeats} runs after {warmup} warm-up runs, each runtime timed in its own block; "
        "PyTorch eager in inference_mode, float32",
        "",
        "| graph | PyTorch eager (ms) | ONNX Runtime (ms) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, eager, ort_ms in rows:
        lines.append(f"| {name} | {eager:.1f} | {ort_ms:.1f} | {eager / ort_ms:.2f}x |")
    by_name = {name: (eager, ort_ms) for name, eager, ort_ms in rows}
    for label, parts in (
        ("cognition + perception + decoder", ("cognition", "perception", "decoder")),
        ("cognition + perception + round_0..3", ("cognition", "perception", "round_0", "round_1", "round_2", "round_3")),
    ):
        if all(p in by_name for p in parts):
            eager = sum(by_name[p][0] for p in parts)
            ort_ms = sum(by_name[p][1] for p in parts)
            lines.append(f"| *sum: {label}* | {eager:.1f} | {ort_ms:.1f} | {eager / ort_ms:.2f}x |")
    lines += [
        "",
        "Sums are of per-graph medians, run one after another (the two encoders could also overlap).",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deris-b-grefcoco")
    parser.add_argument("--checkpoint", help="weights to load (default: seeded random weights; latency does not depend on them)")
    parser.add_argument("--onnx-dir", type=Path, help="an existing export of the same preset and weights (default: export now)")
    parser.add_argument("--msda", default="gridsample", choices=("gridsample",), help="the plugin node has no fast CPU kernel")
    parser.add_argument("--graphs", default=",".join(GRAPH_NAMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="markdown report (default: benchmarks/results/onnx_cpu_<preset>.md)")
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be at least 10 (the report is a median)")
    model = load_model(args.preset, args.checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = args.onnx_dir
        if onnx_dir is None:
            graphs = tuple(g for g in args.graphs.split(",") if g)
            weights = "random" if args.checkpoint is None else Path(args.checkpoint).name
            onnx_dir = export_onnx(model, Path(scratch) / "onnx", ExportOptions(model.cfg.image_size, args.msda, graphs=graphs, weights=weights))
        manifest = read_manifest(onnx_dir)
        load_before = os.getloadavg()[0]
        rows = benchmark(model, onnx_dir, args.threads, args.warmup, args.repeats)
    out = args.out or RESULTS / f"onnx_cpu_{manifest['preset']}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(rows, manifest, args.threads, args.warmup, args.repeats, load_before))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
