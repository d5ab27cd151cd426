"""``deris-export trt``: TensorRT engines from a checkpoint or an ONNX export, checked after the build.

From a checkpoint the graphs are first exported into ``OUT/onnx/`` and verified in ONNX Runtime
as ``deris-export onnx`` does; an existing export (``--onnx``) is linked (or copied) there, so an
engine directory always carries the graphs it was built from. Then:

1. preflight (:mod:`deris.export.trt_preflight`): every graph against the targeted TensorRT's
   parser; a FAIL stops here (exit 1). Without TensorRT the command stops after it too, leaving
   ``OUT/onnx`` and no engines (exit 2, with what to install);
2. one engine per graph, built **strongly typed**: TensorRT keeps the graph's dtypes, so an fp16
   export runs in fp16 with the float32 islands the exporter put around normalisation, softmax
   and MSDA, and an fp32 export runs in fp32 (TF32 off). One optimisation profile covers the
   batch axis (min 1, ``--opt-batch``, ``--max-batch``); every other dimension is static;
3. MSDA nodes: ``trt-plugin`` nodes bind to TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` in
   the version ``--plugin-version`` names (default 2; version 2 exists from TensorRT 10.11, which
   deprecates version 1); ``triton-plugin`` nodes to this project's AOT plugin
   (:mod:`deris.export.triton_plugin`, TensorRT >= 10.9);
4. one timing cache for all graphs: read from ``--timing-cache`` (or the previous ``OUT`` when
   replacing it), written back there and into ``OUT/timing.cache``;
5. parity: every engine against ONNX Runtime on the same inputs through polygraphy's comparator,
   and the end-to-end masks of the engine pipeline against fp32 PyTorch (mask IoU >= 0.99 and the
   same no-target decisions); the table is printed and written to ``OUT/parity.txt``. A failure
   keeps ``OUT`` for inspection, records ``"passed": false`` (the Triton repository generator
   refuses such engines) and exits 1.

``OUT`` is staged and renamed into place like every output of the project. Its ``manifest.json``
is the ONNX manifest plus ``"onnx_dir": "onnx"`` and a ``"tensorrt"`` section: version, compute
capability, preflight target, profile, MSDA plugin, timing cache, engines (file, sha256, bytes,
the sha256 of the graph each was built from) and the parity result.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from deris.atomic import atomic_write, check_output_dir, staged_directory
from deris.cli_support import CheckFailed, ToolError, UsageError
from deris.export.manifest import read_manifest, sha256_file, write_manifest
from deris.export.options import ExportError
from deris.export.trt_preflight import DEFAULT_TARGET, PLUGIN_VERSIONS, TrtTarget, failed, format_preflight, preflight

if TYPE_CHECKING:
    import tensorrt as trt

    from deris.modeling.deris import DeRIS
    from deris.topology import GraphSpec

ONNX_SUBDIR = "onnx"
TIMING_CACHE = "timing.cache"
PARITY_REPORT = "parity.txt"
INSTALL_HINT = (
    "install TensorRT's Python package on a machine with an NVIDIA GPU and driver (`pip install tensorrt-cu12`; "
    "TensorRT >= 10.9 for --msda triton-plugin, >= 10.11 for --plugin-version 2)"
)

# Engine vs ONNX Runtime, per output: max|err| <= rel * max|ORT| + abs. Not yet measured on
# TensorRT. fp16: twice verify.py's ORT-vs-PyTorch budget, since TensorRT's fp16 kernels round
# intermediate results that ORT's CPU kernels keep in float32. fp32 (TF32 off): ten times
# verify.py's, for TensorRT's fused kernels summing in other orders. A wrong layer errs by O(1).
ENGINE_TOLERANCES = {"fp32": (1e-3, 1e-4), "fp16": (4e-2, 4e-3)}
PARITY_BATCHES = (1, 3)
END_TO_END_BATCH = 4
MIN_MASK_IOU = 0.99


class TensorRTUnavailable(ToolError):
    """TensorRT's Python package is not importable here."""


def tensorrt_module() -> ModuleType | None:
    """TensorRT, or None. ``tensorrt-stubs`` installed into site-packages makes ``import tensorrt``
    succeed as an empty namespace package: that is not TensorRT."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


def import_tensorrt() -> ModuleType:
    module = tensorrt_module()
    if module is None:
        raise TensorRTUnavailable(f"TensorRT is not installed here; {INSTALL_HINT}")
    return module


def compute_capability() -> int:
    """Compute capability of the current CUDA device as an int (90 for 9.0), through the CUDA
    runtime library polygraphy loads (cudaDevAttrComputeCapabilityMajor/Minor = 75/76)."""
    from polygraphy import cuda
    from polygraphy.exception import PolygraphyException

    try:
        runtime = cuda.wrapper().handle
        device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        statuses = (
            runtime.cudaGetDevice(ctypes.byref(device)),
            runtime.cudaDeviceGetAttribute(ctypes.byref(major), 75, device),
            runtime.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device),
        )
    except (OSError, AttributeError, PolygraphyException) as exc:
        raise ToolError(f"cannot load the CUDA runtime to query the GPU ({exc}); TensorRT needs an NVIDIA GPU") from None
    if any(statuses):
        raise ToolError(f"the CUDA runtime found no usable GPU (status {max(statuses)})")
    return major.value * 10 + minor.value


# --- building ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    batch: tuple[int, int, int]  # min, opt, max of the profile
    workspace_gib: float = 4.0
    plugin_version: str = "2"  # MultiscaleDeformableAttnPlugin_TRT's
    timing_cache: Path | None = None  # --timing-cache: also written after the build (besides OUT/timing.cache)


def profile_shapes(shape: Sequence[int | str], batch: tuple[int, int, int]) -> list[list[int]]:
    """(min, opt, max) shapes of one input: its dynamic (named) dimension is the batch axis."""
    return [[b if isinstance(d, str) else int(d) for d in shape] for b in batch]


def network_bytes(onnx_path: Path, plugin_version: str) -> bytes:
    """The graph as the parser should read it: ``MultiscaleDeformableAttnPlugin_TRT`` nodes bound
    to ``plugin_version``. The exporter writes version 1 (which every TensorRT 10 has); the choice
    of the TensorRT-side plugin is the build's, so the graph files stay as verified. Weights in
    external data stay on disk: the parser reads them relative to ``onnx_path``."""
    import onnx

    from deris.export.msda import PLUGIN_DOMAIN, PLUGIN_OP

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if (node.domain, node.op_type) == (PLUGIN_DOMAIN, PLUGIN_OP):
            for attribute in node.attribute:
                if attribute.name == "plugin_version":
                    attribute.s = plugin_version.encode()
    data: bytes = model.SerializeToString()
    return data


def _register_plugins(logger: trt.ILogger, msda: str) -> None:
    import tensorrt as trt

    # Built-in plugins (MultiscaleDeformableAttnPlugin_TRT) are looked up by the parser by name.
    trt.init_libnvinfer_plugins(logger, "")
    if msda == "triton-plugin":
        from deris.export.triton_plugin import register_tensorrt_plugin

        register_tensorrt_plugin()


def build_engine(
    logger: trt.ILogger, onnx_path: Path, entry: dict[str, Any], precision: str, options: BuildOptions,
    cache: trt.ITimingCache,
) -> bytes:
    """One serialized engine; ``cache`` is shared by all the builds and grows with each."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(network_bytes(onnx_path, options.plugin_version), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds inputs to 10 bits
    config.set_timing_cache(cache, False)
    profile = builder.create_optimization_profile()
    for tensor in entry["inputs"]:
        low, opt, high = (trt.Dims(s) for s in profile_shapes(tensor["shape"], options.batch))
        profile.set_shape(tensor["name"], low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    return bytes(memoryview(serialized))


def build_engines(onnx_dir: Path, out: Path, options: BuildOptions, previous_cache: bytes = b"",
                  progress: bool = True) -> dict[str, Any]:
    """Engines for every graph of ``onnx_dir`` into ``out`` (plans and timing cache), starting from
    the tactics in ``previous_cache``; returns the manifest's ``"tensorrt"`` section without the
    parity result."""
    import tensorrt as trt
    from tqdm import tqdm

    manifest = read_manifest(onnx_dir)
    capability = compute_capability()  # before hours of building: is there a GPU at all?
    logger = trt.Logger(trt.Logger.WARNING)
    _register_plugins(logger, manifest["msda"])
    engines: dict[str, Any] = {}
    cache = trt.Builder(logger).create_builder_config().create_timing_cache(previous_cache)
    bar = tqdm(manifest["graphs"].items(), desc="tensorrt", unit="engine", disable=not progress)
    for name, entry in bar:
        bar.set_postfix_str(name)
        plan = build_engine(logger, onnx_dir / entry["file"], entry, manifest["precision"], options, cache)
        path = atomic_write(out / f"{name}.plan", plan)
        engines[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": len(plan),
                         "onnx_sha256": entry["files"][0]["sha256"]}
    bar.close()
    timing = bytes(memoryview(cache.serialize()))
    atomic_write(out / TIMING_CACHE, timing)
    if options.timing_cache is not None:
        atomic_write(options.timing_cache, timing)
    msda = manifest["msda"]
    plugin: dict[str, Any] | None = None
    if msda == "trt-plugin":
        plugin = {"name": "MultiscaleDeformableAttnPlugin_TRT", "version": options.plugin_version}
    elif msda == "triton-plugin":
        from deris.export.triton_plugin import PLUGIN_ID

        plugin = {"name": PLUGIN_ID, "aot": True}
    low, opt, high = options.batch
    return {
        "version": trt.__version__,
        "compute_capability": f"{capability // 10}.{capability % 10}",
        "strongly_typed": True,
        "profile": {"min": low, "opt": opt, "max": high},
        "msda_plugin": plugin,
        "timing_cache": TIMING_CACHE,
        "engines": engines,
    }


# --- parity --------------------------------------------------------------------------------------

Feeds = dict[str, NDArray[Any]]
RunnerFactory = Callable[[str], Any]  # graph name -> a polygraphy runner (not yet activated)


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    batch: int
    output: str
    max_abs: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.tolerance


@dataclass(frozen=True)
class EndToEndCheck:
    layout: str
    sample: int
    mask_iou: float
    no_target_reference: bool
    no_target_engine: bool

    @property
    def passed(self) -> bool:
        return self.mask_iou >= MIN_MASK_IOU and self.no_target_reference == self.no_target_engine


@dataclass
class ParityReport:
    graphs: list[GraphCheck] = field(default_factory=list)
    end_to_end: list[EndToEndCheck] = field(default_factory=list)
    reference: str = "fp32 PyTorch"  # what the end-to-end masks were compared with

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.graphs) and all(c.passed for c in self.end_to_end)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "report": PARITY_REPORT, "end_to_end_reference": self.reference,
                "graphs": [asdict(c) | {"passed": c.passed} for c in self.graphs],
                "end_to_end": [asdict(c) | {"passed": c.passed} for c in self.end_to_end]}


def _cast(entry: dict[str, Any], feeds: Feeds) -> Feeds:
    """The graph's inputs from ``feeds``, float ones in the graph's float dtype."""
    cast = {}
    for tensor in entry["inputs"]:
        value = np.asarray(feeds[tensor["name"]])
        cast[tensor["name"]] = value.astype(tensor["dtype"]) if value.dtype.kind == "f" else value
    return cast


def _inputs(manifest: dict[str, Any], batch: int, seed: int) -> Feeds:
    from deris.config import get_config
    from deris.export.verify import synthetic_inputs

    inputs = synthetic_inputs(get_config(manifest["preset"]), manifest["resolution"], batch, seed)
    return {name: tensor.numpy() for name, tensor in inputs.items()}


def ort_runner_factory(onnx_dir: Path) -> RunnerFactory:
    """Polygraphy runners of the graphs in ONNX Runtime (the parity reference, and the stand-in
    for engines in the CPU tests)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from deris.export.runtime import ort_session

    manifest = read_manifest(onnx_dir)

    def runner(graph: str) -> Any:
        entry = manifest["graphs"][graph]
        return OnnxrtRunner(ort_session(onnx_dir / entry["file"], entry["custom_ops"]), name="onnxruntime")

    return runner


def engine_runner_factory(engines_dir: Path) -> RunnerFactory:
    """Polygraphy runners of the engines of a ``deris-export trt`` directory (needs the GPU)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    trt = import_tensorrt()
    manifest = read_manifest(engines_dir)
    _register_plugins(trt.Logger(trt.Logger.WARNING), manifest["msda"])
    engines = manifest["tensorrt"]["engines"]

    def runner(graph: str) -> Any:
        return TrtRunner(EngineFromBytes((engines_dir / engines[graph]["file"]).read_bytes()), name="tensorrt")

    return runner


def _chain_values(onnx_dir: Path, manifest: dict[str, Any], inputs: Feeds) -> Feeds:
    """Every value of the pipeline, computed by ONNX Runtime: the feeds both runners get."""
    from deris.export.runtime import OnnxPipeline
    from deris.topology import run_chain

    pipeline = OnnxPipeline(onnx_dir, optimized=False)  # the graphs the engines were built from
    needed = pipeline.topology.needed(list(manifest["graphs"]))
    return run_chain(needed, lambda spec, feeds: pipeline.run(spec.name, feeds), inputs)


def graph_parity(onnx_dir: Path, engines: RunnerFactory, batches: Sequence[int] = PARITY_BATCHES,
                 seed: int = 0) -> list[GraphCheck]:
    """Each engine and ONNX Runtime on the same inputs (ORT's chained values of synthetic inputs),
    compared by polygraphy's ``Comparator`` with a per-output absolute tolerance."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from deris.topology import Topology

    manifest = read_manifest(onnx_dir)
    rel, absolute = ENGINE_TOLERANCES[manifest["precision"]]
    reference = ort_runner_factory(onnx_dir)
    topology = Topology.from_json(manifest["topology"])
    checks = []
    for batch in batches:
        values = _chain_values(onnx_dir, manifest, _inputs(manifest, batch, seed))
        for name, entry in manifest["graphs"].items():
            spec = topology.graphs[name]
            feeds = _cast(entry, {t.name: values[t.value] for t in spec.inputs})
            with G_LOGGER.verbosity(G_LOGGER.ERROR):
                results = Comparator.run([engines(name), reference(name)], data_loader=[feeds])
                expected = results[1][1][0]
                tolerances = {out: rel * float(np.abs(expected[out].astype(np.float64)).max()) + absolute
                              for out in expected.keys()}
                compared = Comparator.compare_accuracy(
                    results, compare_func=SimpleCompareFunc(atol=tolerances, rtol={"": 0.0}, check_error_stat="max")
                )
            (per_output,) = next(iter(compared[0].values()))
            for out, result in per_output.items():
                # A shape mismatch or NaN leaves no finite statistic: it counts as an infinite error.
                error = float(getattr(result, "max_absdiff", np.inf))
                checks.append(GraphCheck(name, batch, out, error if np.isfinite(error) else np.inf, tolerances[out]))
    return checks


def _decisions(mask_logits: NDArray[Any], refer_logits: NDArray[Any], score_threshold: float) -> tuple[Any, Any]:
    import torch

    from deris.postprocess import decide

    _, selected, masks = decide(torch.from_numpy(mask_logits.astype(np.float32)),
                                torch.from_numpy(refer_logits.astype(np.float32)), score_threshold)
    return masks.numpy(), ~selected.any(dim=1).numpy()


def _run_engines(graphs: Sequence[GraphSpec], engines: RunnerFactory, manifest: dict[str, Any], inputs: Feeds) -> Feeds:
    """The values of one layout's chain run by the engines (runners activated for the chain)."""
    from deris.topology import run_chain

    with contextlib.ExitStack() as stack:
        runners = {g.name: stack.enter_context(engines(g.name)) for g in graphs}

        def run(spec: GraphSpec, feeds: Feeds) -> Feeds:
            return dict(runners[spec.name].infer(_cast(manifest["graphs"][spec.name], feeds)))

        return run_chain(list(graphs), run, inputs)


def end_to_end_parity(onnx_dir: Path, engines: RunnerFactory, model: DeRIS, batch: int = END_TO_END_BATCH,
                      seed: int = 0) -> list[EndToEndCheck]:
    """Masks and no-target decisions of the engine pipeline (each layout whose graphs were built)
    against ``model`` in fp32 PyTorch, on fixed synthetic inputs (one row per sample)."""
    import torch

    import deris.kernels as kernels
    from deris.topology import LAYOUTS, Topology

    manifest = read_manifest(onnx_dir)
    topology = Topology.from_json(manifest["topology"])
    inputs = _inputs(manifest, batch, seed)
    with kernels.backend("torch"), torch.inference_mode():
        expected = model(*(torch.from_numpy(inputs[n]) for n in ("img", "img_mini", "token_ids", "text_pad_mask")))
    threshold = model.cfg.score_threshold
    ref_masks, ref_empty = _decisions(expected["pred_masks_lowres"].numpy(), expected["pred_refer_logits"].numpy(), threshold)
    checks = []
    for layout in LAYOUTS:
        graphs = topology.layout(layout)
        if any(g.name not in manifest["graphs"] for g in graphs):
            continue
        values = _run_engines(graphs, engines, manifest, inputs)
        final = topology.final_values()
        masks, empty = _decisions(values[final["mask_logits"]], values[final["refer_logits"]], threshold)
        for sample in range(batch):
            union = np.logical_or(masks[sample], ref_masks[sample]).sum()
            iou = float(np.logical_and(masks[sample], ref_masks[sample]).sum() / union) if union else 1.0
            checks.append(EndToEndCheck(layout, sample, iou, bool(ref_empty[sample]), bool(empty[sample])))
    return checks


def format_parity(report: ParityReport) -> str:
    def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]

    def verdict(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    lines = ["engines vs ONNX Runtime (same inputs, polygraphy Comparator):"]
    lines += table(("graph", "batch", "output", "max abs err", "tolerance", "result"), [
        (c.graph, str(c.batch), c.output, f"{c.max_abs:.2e}", f"{c.tolerance:.2e}", verdict(c.passed)) for c in report.graphs
    ])
    if report.end_to_end:
        lines += ["", f"engine pipeline vs {report.reference} (mask IoU >= {MIN_MASK_IOU}, same no-target decision):"]
        lines += table(("layout", "sample", "mask IoU", "no target (reference)", "no target (engine)", "result"), [
            (c.layout, str(c.sample), f"{c.mask_iou:.4f}", str(c.no_target_reference), str(c.no_target_engine),
             verdict(c.passed)) for c in report.end_to_end
        ])
    return "\n".join(lines)


def check_engines(onnx_dir: Path, engines: RunnerFactory, model: DeRIS | None, max_batch: int) -> ParityReport:
    """Both parity checks at batches the profile accepts; without a PyTorch model only the per-graph one."""
    report = ParityReport(graph_parity(onnx_dir, engines, sorted({min(b, max_batch) for b in PARITY_BATCHES})))
    if model is None:
        report.reference = "(skipped: pass --checkpoint for the end-to-end check)"
    else:
        report.end_to_end = end_to_end_parity(onnx_dir, engines, model, min(END_TO_END_BATCH, max_batch))
    return report


# --- the command ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtRequest:
    """``deris-export trt`` as parsed: a model to export, or an export to build from."""

    out: Path | None
    onnx: Path | None = None
    preset: str | None = None
    checkpoint: Path | None = None
    random_weights: bool = False
    precision: str | None = None  # default: fp16 from a model, the export's with --onnx
    resolution: int | None = None
    msda: str = "trt-plugin"
    opt_batch: int = 1
    max_batch: int | None = None
    trt_version: str | None = None  # default: the installed TensorRT, else DEFAULT_TARGET
    plugin_version: str = "2"
    workspace_gib: float = 4.0
    timing_cache: Path | None = None
    check_only: bool = False
    force: bool = False


def _check_request(request: TrtRequest) -> None:
    if request.onnx is not None:
        given = [flag for flag, value in (("--preset", request.preset), ("--random-weights", request.random_weights),
                                          ("--resolution", request.resolution)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} describe a model to export; with --onnx they come from the export")
    elif request.preset is None or (request.checkpoint is None) == (not request.random_weights):
        raise UsageError("give --onnx DIR, or --preset with --checkpoint (or --random-weights)")
    if request.out is None and not (request.check_only and request.onnx is not None):
        raise UsageError("--out is required (only `--check-only --onnx DIR` writes nothing)")
    if request.plugin_version not in PLUGIN_VERSIONS:
        raise UsageError(f"--plugin-version must be one of {', '.join(PLUGIN_VERSIONS)}, got {request.plugin_version!r}")
    if request.workspace_gib <= 0:
        raise UsageError(f"--workspace-gib must be positive, got {request.workspace_gib}")


def _profile(request: TrtRequest, export_max: int) -> tuple[int, int, int]:
    high = export_max if request.max_batch is None else request.max_batch
    if not 1 <= request.opt_batch <= high <= export_max:
        raise ExportError(f"batch sizes must satisfy 1 <= --opt-batch ({request.opt_batch}) <= --max-batch ({high}) "
                          f"<= {export_max} (the export's limit)")
    return 1, request.opt_batch, high


def _check_complete(onnx_dir: Path, manifest: dict[str, Any]) -> None:
    """Parity feeds each engine the pipeline's own values: the graphs they come from must be there."""
    from deris.topology import Topology

    graphs = list(manifest["graphs"])
    missing = [g.name for g in Topology.from_json(manifest["topology"]).needed(graphs) if g.name not in graphs]
    if missing:
        raise ExportError(f"the export in {onnx_dir} lacks {', '.join(missing)}, which its graphs' inputs come from; "
                          "export every graph (no --graphs) to build engines")


def _link_tree(source: Path, target: Path) -> None:
    """Copy an export directory as hard links where the filesystem allows (no second copy of the
    weights), as copies elsewhere."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def _export(request: TrtRequest, onnx_dir: Path, progress: bool) -> DeRIS:
    """Export and verify the graphs as ``deris-export onnx`` does; return the model."""
    from deris.config import get_config
    from deris.export.onnx_export import export_onnx, load_model
    from deris.export.options import ExportOptions, check_resolution
    from deris.export.verify import require_verified

    assert request.preset is not None
    cfg = get_config(request.preset)
    resolution = check_resolution(request.resolution if request.resolution is not None else cfg.image_size)
    weights = "random" if request.random_weights else Path(str(request.checkpoint)).name
    # TensorRT reads the plain graphs; ONNX Runtime's rewrite would only cost time.
    options = ExportOptions(resolution, request.msda, request.precision or "fp16", None, weights, ort_optimize=False)
    model = load_model(request.preset, request.checkpoint)
    export_onnx(model, onnx_dir, options, progress=progress)
    require_verified(onnx_dir, model, f"the export is kept in {onnx_dir}; `deris-export onnx` shows the same table")
    return model


def _reference_model(request: TrtRequest, manifest: dict[str, Any]) -> DeRIS | None:
    """The fp32 PyTorch model of an existing export, where it can be had: its checkpoint, or the
    seeded random weights `--random-weights` exports use."""
    from deris.export.onnx_export import load_model

    if request.checkpoint is not None:
        return load_model(manifest["preset"], request.checkpoint)
    if manifest["weights"] == "random":
        return load_model(manifest["preset"], None)
    return None


def _preflight(onnx_dir: Path, target: TrtTarget, batch: tuple[int, int, int], plugin_version: str) -> None:
    rows = preflight(onnx_dir, target, batch, plugin_version)
    print(format_preflight(rows))
    bad = failed(rows)
    if bad:
        raise CheckFailed(f"{len(bad)} preflight check(s) failed for TensorRT {target}: TensorRT would refuse or "
                          "miscompute these graphs (see the table)")
    print(f"preflight passed for TensorRT {target}")


def _batch_profile(request: TrtRequest) -> tuple[int, int, int]:
    """The (min, opt, max) profile, after checking an ``--onnx`` export against the request."""
    if request.onnx is None:
        from deris.topology import MAX_BATCH

        return _profile(request, MAX_BATCH)
    source = read_manifest(request.onnx)
    if request.precision not in (None, source["precision"]):
        raise ExportError(f"--precision {request.precision}: the export in {request.onnx} is {source['precision']}; "
                          f"export it again with --precision {request.precision}")
    _check_complete(request.onnx, source)
    return _profile(request, source["batch"]["max"])


def _build_and_check(request: TrtRequest, onnx_dir: Path, staging: Path, target: TrtTarget, batch: tuple[int, int, int],
                     previous_cache: bytes, model: DeRIS | None, engines: Callable[[Path], RunnerFactory],
                     progress: bool) -> ParityReport:
    """Engines, manifest and parity report into ``staging``."""
    options = BuildOptions(batch, request.workspace_gib, request.plugin_version, request.timing_cache)
    section = build_engines(onnx_dir, staging, options, previous_cache, progress)
    manifest = read_manifest(onnx_dir) | {"onnx_dir": ONNX_SUBDIR, "tensorrt": section | {"preflight_target": str(target)}}
    write_manifest(staging, manifest)  # the engine runners read it
    report = check_engines(onnx_dir, engines(staging), model or _reference_model(request, manifest), batch[2])
    text = format_parity(report)
    print(text)
    (staging / PARITY_REPORT).write_text(text + "\n")
    manifest["tensorrt"]["parity"] = report.to_json()
    write_manifest(staging, manifest)
    return report


def run_trt(request: TrtRequest, progress: bool = True,
            engines: Callable[[Path], RunnerFactory] = engine_runner_factory) -> Path | None:
    """The whole command; returns the engine directory (None for ``--check-only --onnx``).
    ``engines`` makes the runners the parity check uses for a built engine directory."""
    _check_request(request)
    trt_module = tensorrt_module()
    target = TrtTarget.parse(request.trt_version or (trt_module.__version__ if trt_module else DEFAULT_TARGET))
    batch = _batch_profile(request)
    if request.out is None:  # --check-only --onnx: nothing is written
        assert request.onnx is not None
        _preflight(request.onnx, target, batch, request.plugin_version)
        return None
    out = request.out
    check_output_dir(out, request.force)  # before an export that takes minutes
    # Tactics measured before: --timing-cache, else those of the engines being replaced.
    previous = next((p.read_bytes() for p in (request.timing_cache, out / TIMING_CACHE) if p and p.is_file()), b"")
    report: ParityReport | None = None
    with staged_directory(out, request.force) as staging:
        onnx_dir = staging / ONNX_SUBDIR
        if request.onnx is not None:
            _link_tree(request.onnx, onnx_dir)
            model = None
        else:
            model = _export(request, onnx_dir, progress)
        _preflight(onnx_dir, target, batch, request.plugin_version)
        # With --check-only or without TensorRT, OUT keeps the verified graphs only: no engines, no manifest.
        if not request.check_only and trt_module is not None:
            report = _build_and_check(request, onnx_dir, staging, target, batch, previous, model, engines, progress)
    if trt_module is None and not request.check_only:
        raise TensorRTUnavailable(
            f"TensorRT is not installed here, so no engines were built. The verified graphs (preflight passed for "
            f"TensorRT {target}) are in {out / ONNX_SUBDIR}. To build the engines, {INSTALL_HINT}, then run: "
            f"deris-export trt --onnx {out / ONNX_SUBDIR} --out {out} --force"
        )
    if report is not None and not report.passed:
        raise CheckFailed(f"engine parity failed (table above, also in {out / PARITY_REPORT}); the engines are kept in "
                          f"{out} for inspection and marked as failed in its manifest.json")
    return out
