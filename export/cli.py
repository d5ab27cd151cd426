"""``deris-export``: ONNX graphs, TensorRT engines and a Triton Inference Server repository.

Every subcommand follows :mod:`deris.cli_support` (flags, errors, exit codes). Heavy modules (torch,
onnx) are imported inside the commands, so ``--help`` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deris.cli_support import (
    EXIT_OK,
    add_command,
    add_force,
    add_onnx,
    add_preset,
    add_quiet,
    resolve_model,
    run_main,
)
from deris.export.options import MSDA_MODES, PRECISIONS, ExportOptions, check_resolution

PROG = "deris-export"


def _graph_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("no graph names given")
    return names


def _run_onnx(args: argparse.Namespace) -> int:
    from deris.atomic import check_output_dir
    from deris.config import get_config

    # Cheap checks first: a bad output directory should not wait for a checkpoint to load.
    preset, checkpoint = resolve_model(args.preset, args.checkpoint, args.random_weights)
    cfg = get_config(preset)
    resolution = check_resolution(args.resolution if args.resolution is not None else cfg.image_size)
    check_output_dir(Path(args.out), args.force)
    weights = "random" if checkpoint is None else Path(checkpoint).name
    options = ExportOptions(resolution, args.msda, args.precision, args.graphs, weights, ort_optimize=args.ort_optimize)
    from deris.topology import pipeline_topology

    options.validate(pipeline_topology(cfg, resolution).graph_names)

    from deris.export.onnx_export import export_onnx, load_model
    from deris.export.verify import require_verified

    model = load_model(preset, checkpoint)
    out = export_onnx(model, args.out, options, force=args.force, progress=not args.quiet)
    print(f"wrote {out}")
    if args.no_verify:
        return EXIT_OK
    require_verified(out, model, f"the export is kept in {out} for inspection")
    return EXIT_OK


def register_onnx(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "onnx", run=_run_onnx,
        help="export the model to ONNX graphs (+ manifest.json) and verify them in ONNX Runtime",
        description="Export the cognition and perception encoders, one graph per loopback round and the fused decoder "
        "(the cut is in docs/deployment.md), with a dynamic batch axis and a fixed perception resolution. Every graph "
        "is then run in ONNX Runtime and compared with PyTorch; a table shows each output's error.",
        examples="  deris-export onnx --out exports/demo                 # the built-in demo model\n"
        "  deris-export onnx --preset deris-b-grefcoco --checkpoint DeRIS-B-grefcoco.pth --out exports/b-384\n"
        "  deris-export onnx --preset deris-tiny --random-weights --msda trt-plugin --precision fp16 --out /tmp/t",
    )
    add_preset(p, required=False, extra=" (default: the built-in demo model)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="official or deris-format checkpoint to load")
    weights.add_argument("--random-weights", action="store_true", help="export randomly initialised weights (for testing only)")
    p.add_argument("--resolution", type=int, help="perception input size, a positive multiple of 32 (default: the preset's)")
    p.add_argument("--msda", choices=MSDA_MODES, default="gridsample",
                   help="how deformable attention is exported: gridsample (ONNX GridSample, runs anywhere), trt-plugin "
                   "(TensorRT's MultiscaleDeformableAttnPlugin_TRT node) or triton-plugin (this project's Triton kernel as an "
                   "ahead-of-time TensorRT plugin) (default: gridsample)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="graph storage precision (default: fp32)")
    p.add_argument("--graphs", type=_graph_list, help="comma-separated subset of the graphs, e.g. cognition,perception (default: all)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    add_force(p)
    p.add_argument("--no-ort-optimize", dest="ort_optimize", action="store_false",
                   help="do not write <graph>.opt.onnx, each fp32 graph rewritten offline for ONNX Runtime (fused GELU and "
                   "LayerNorm; docs/deployment.md), which ONNX Runtime consumers load "
                   "instead of the plain graph (TensorRT reads the plain one)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison (of both graph files)")
    add_quiet(p)


def _run_trt(args: argparse.Namespace) -> int:
    from deris.export.tensorrt_build import TrtRequest, run_trt

    request = TrtRequest(
        out=args.out, onnx=args.onnx, preset=args.preset, checkpoint=args.checkpoint, random_weights=args.random_weights,
        precision=args.precision, resolution=args.resolution, msda=args.msda, opt_batch=args.opt_batch,
        max_batch=args.max_batch, trt_version=args.trt_version, plugin_version=args.plugin_version,
        workspace_gib=args.workspace_gib, timing_cache=args.timing_cache, check_only=args.check_only, force=args.force,
    )
    out = run_trt(request, progress=not args.quiet)
    if out is not None:
        print(f"wrote {out}")
    return EXIT_OK


def register_trt(subparsers: argparse._SubParsersAction) -> None:
    from deris.export.trt_preflight import DEFAULT_TARGET, PLUGIN_VERSIONS

    p = add_command(
        subparsers, "trt", run=_run_trt,
        help="build TensorRT engines from a checkpoint or an ONNX export, and check them (needs TensorRT and a GPU)",
        description="From a checkpoint: export the ONNX graphs into OUT/onnx and verify them in ONNX Runtime, as "
        "`deris-export onnx` does. Then check every graph against what the targeted TensorRT's ONNX parser supports "
        "(the preflight; --check-only stops there), build one strongly typed engine per graph with an optimisation "
        "profile over the batch and a shared timing cache, and compare every engine with ONNX Runtime and the engine "
        "pipeline's masks with fp32 PyTorch. Without TensorRT the command stops after the preflight and says what to "
        "install; OUT then holds only the verified graphs.",
        examples="  deris-export trt --preset deris-b-grefcoco --checkpoint DeRIS-B-grefcoco.pth --precision fp16 --out engines/b\n"
        "  deris-export trt --onnx exports/b-384 --max-batch 8 --out engines/b-384\n"
        "  deris-export trt --onnx exports/b-384 --check-only --trt-version 10.9",
    )
    # What to build from: --preset with --checkpoint (or --random-weights), or --onnx (checked by run_trt).
    add_preset(p, required=False)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path,
                         help="official or deris-format checkpoint (with --onnx: the export's weights, for the end-to-end check)")
    weights.add_argument("--random-weights", action="store_true", help="randomly initialised weights (for testing only)")
    add_onnx(p, required=False, help="ONNX export directory (from `deris-export onnx`) to build from, instead of --preset")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="fp16: the strongly typed fp16 graph with its float32 islands; fp32: fp32 throughout "
                   "(default: fp16 from a checkpoint, the export's precision with --onnx)")
    p.add_argument("--resolution", type=int, help="perception input size, a positive multiple of 32 (default: the preset's)")
    p.add_argument("--msda", choices=MSDA_MODES, default="trt-plugin",
                   help="how deformable attention is exported: trt-plugin (TensorRT's MultiscaleDeformableAttnPlugin_TRT), "
                   "triton-plugin (this project's Triton kernel as an AOT plugin, TensorRT >= 10.9) or gridsample "
                   "(default: trt-plugin)")
    p.add_argument("--plugin-version", choices=PLUGIN_VERSIONS, default="2",
                   help="MultiscaleDeformableAttnPlugin_TRT version: 2 (TensorRT >= 10.11) or 1 (every TensorRT 10, "
                   "deprecated since 10.11) (default: 2)")
    p.add_argument("--opt-batch", type=int, default=1, help="batch size TensorRT optimises for (default: 1)")
    p.add_argument("--max-batch", type=int, help="largest batch the engines accept (default: the export's maximum)")
    p.add_argument("--trt-version", metavar="X.Y",
                   help=f"TensorRT release the preflight checks against (default: the installed one, else {DEFAULT_TARGET})")
    p.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace limit in GiB (default: 4)")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="TensorRT timing cache to start from and update (default: the one of the OUT being replaced)")
    p.add_argument("--check-only", action="store_true",
                   help="only the preflight (no TensorRT needed); with --onnx, --out is not needed")
    p.add_argument("--out", type=Path, help="output directory: onnx/, <graph>.plan, timing.cache, parity.txt, manifest.json")
    add_force(p)
    add_quiet(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``deris-export`` parser: onnx, trt, triton-repo."""
    from deris.triton_repo import repository

    parser = argparse.ArgumentParser(
        prog=PROG, description="Export DeRIS to ONNX, TensorRT and a Triton Inference Server repository. "
        "See `deris-export COMMAND --help`.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_onnx(subparsers)
    register_trt(subparsers)
    repository.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
