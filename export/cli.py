"""``deris-export``: ONNX export and TensorRT engines for DeRIS.

    deris-export onnx --preset deris-b-grefcoco --checkpoint deris_b.pth --out exports/b-384
    deris-export onnx --preset deris-tiny --random-weights --msda trt-plugin --precision fp16 --out /tmp/t
    deris-export trt --onnx-dir exports/b-384 --out engines/b-384

Exit codes: 0 success, 1 verification failed (a graph is out of tolerance), 2 the request was
invalid (bad preset, resolution, output directory, checkpoint) or a tool is missing (TensorRT).

Subcommands are registered by ``register(subparsers)`` functions in :func:`build_parser`; each
sets ``run=<callable(args) -> exit code>`` as its parser default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from deris.config import PRESETS
from deris.export.graphs import GRAPH_NAMES
from deris.export.msda import MSDA_MODES
from deris.export.onnx_export import (
    ExportError,
    ExportOptions,
    check_output_dir,
    check_resolution,
    export_onnx,
    load_model,
    preset_config,
)
from deris.export.precision import PRECISIONS
from deris.export.tensorrt_build import TensorRTUnavailable, build_engines
from deris.export.verify import format_table, verify_export

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _graph_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in GRAPH_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown graph(s) {unknown or text!r}; accepted: {', '.join(GRAPH_NAMES)}")
    return names


def _run_onnx(args: argparse.Namespace) -> int:
    # Cheap checks first: a bad output directory should not wait for a checkpoint to load.
    try:
        cfg = preset_config(args.preset)
        resolution = check_resolution(args.resolution if args.resolution is not None else cfg.image_size)
        check_output_dir(Path(args.out), args.force)
        weights = "random" if args.random_weights else Path(args.checkpoint).name
        options = ExportOptions(resolution, args.msda, args.precision, args.graphs, weights)
        options.validate()
        model = load_model(args.preset, args.checkpoint)
    except ExportError as e:
        print(f"deris-export onnx: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.random_weights:
        print("warning: exporting RANDOM weights (--random-weights): the graphs' outputs are meaningless", file=sys.stderr)
    out = export_onnx(model, args.out, options, force=args.force, progress=not args.quiet)
    print(f"wrote {out}")
    if args.no_verify:
        return EXIT_OK
    checks = verify_export(out, model)
    print(format_table(checks))
    failed = [c for c in checks if not c.passed]
    if failed:
        print(f"verification FAILED: {len(failed)} of {len(checks)} outputs out of tolerance", file=sys.stderr)
        return EXIT_FAILED
    print(f"verification passed: {len(checks)} outputs within tolerance")
    return EXIT_OK


def register_onnx(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("onnx", help="export the model to ONNX graphs (+ manifest.json) and verify them in ONNX Runtime")
    p.add_argument("--preset", required=True, help=f"model preset: {', '.join(PRESETS)}")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="official or deris-format checkpoint to load")
    weights.add_argument("--random-weights", action="store_true", help="export randomly initialised weights (for testing only)")
    p.add_argument("--resolution", type=int, help="perception input size, a positive multiple of 32 (default: the preset's)")
    p.add_argument("--msda", choices=MSDA_MODES, default="gridsample", help="how deformable attention is exported (default: gridsample)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="graph storage precision (default: fp32)")
    p.add_argument(
        "--graphs", type=_graph_list, default=GRAPH_NAMES, help=f"comma-separated subset of: {','.join(GRAPH_NAMES)} (default: all)"
    )
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_onnx)


def _run_trt(args: argparse.Namespace) -> int:
    try:
        out = build_engines(
            args.onnx_dir, args.out, opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_gib=args.workspace_gib,
            force=args.force, progress=not args.quiet,
        )
    except (TensorRTUnavailable, FileNotFoundError, ValueError) as e:  # ValueError includes ExportError
        print(f"deris-export trt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}")
    return EXIT_OK


def register_trt(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("trt", help="build TensorRT FP16 engines from an ONNX export directory (needs TensorRT and a GPU)")
    p.add_argument("--onnx-dir", required=True, help="directory written by 'deris-export onnx'")
    p.add_argument("--out", required=True, help="output directory for <graph>.plan files and manifest.json")
    p.add_argument("--opt-batch", type=int, default=1, help="batch size TensorRT optimises for (default: 1)")
    p.add_argument("--max-batch", type=int, help="largest batch the engines accept (default: the export's maximum)")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit in GiB (default: 4)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_trt)


def build_parser() -> argparse.ArgumentParser:
    """The ``deris-export`` parser: onnx, trt, triton-repo."""
    from deris.export import triton_repo

    parser = argparse.ArgumentParser(
        prog="deris-export", description="Export DeRIS to ONNX, TensorRT and a Triton Inference Server repository."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_onnx(subparsers)
    register_trt(subparsers)
    triton_repo.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print("interrupted (an unfinished output directory is never left behind)", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
