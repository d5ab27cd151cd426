"""Export a DeRIS model to a directory of ONNX graphs plus ``manifest.json``.

The graphs are those of :func:`deris.topology.pipeline_topology` for the model's config and the
requested resolution. fp32 exports also hold each graph rewritten offline for ONNX Runtime
(``<graph>.opt.onnx``, :mod:`deris.export.ort_optimize`), which ONNX Runtime consumers load; the
plain graphs stay for TensorRT. The directory is staged and renamed into place (:mod:`deris.atomic`), so
``out`` is either complete or absent, also when the export fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

import deris
from deris.atomic import staged_directory
from deris.export.graphs import build_graph, example_inputs
from deris.export.manifest import FORMAT_VERSION, describe_graph, write_manifest
from deris.export.msda import custom_translation_table, msda_representation
from deris.export.options import ExportError, ExportOptions
from deris.export.ort_optimize import optimize_export
from deris.export.precision import float_dtype, for_precision, keep_in_float32
from deris.modeling.deris import DeRIS
from deris.topology import BATCH, MAX_BATCH, GraphSpec, pipeline_topology

# Opset 18: the dynamo exporter's lowest, and below 20, where TensorRT misreads GridSample.
OPSET = 18
# Protobuf cannot serialise 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Tracing with batch 2: batch 1 would let the tracer specialise size-1 dimensions.
TRACE_BATCH = 2


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's known-harmless chatter (missing torchvision ops, pytree deprecations,
    the shared "batch" dimension name) so the progress display stays readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        try:
            yield
        finally:
            logger.setLevel(level)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def export_graph(
    model: DeRIS,
    spec: GraphSpec,
    directory: Path,
    options: ExportOptions,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> dict[str, Any]:
    """Export one graph to ``directory/<name>.onnx`` (plus ``.onnx.data`` above the threshold),
    check it with the full ONNX checker, and return its manifest entry."""
    module = for_precision(build_graph(spec, model), options.precision)
    dtype = float_dtype(options.precision)
    args = example_inputs(spec, TRACE_BATCH, dtype, vocab_size=model.cfg.beit3.vocab_size)
    batch = torch.export.Dim(BATCH, min=1, max=MAX_BATCH)
    with _quiet_exporter(), msda_representation(options.msda), torch.no_grad():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes={t.name: {0: batch} for t in spec.inputs},
            custom_translation_table=custom_translation_table(options.msda),
            verbose=False,
        )
    assert program is not None
    if options.precision == "fp16":
        keep_in_float32(program.model)
    path = directory / f"{spec.name}.onnx"
    external = _initializer_bytes(program.model) > external_data_threshold
    ir.save(program.model, path, external_data=f"{path.name}.data" if external else None)
    del program, module
    onnx.checker.check_model(str(path), full_check=True)
    entry: dict[str, Any] = describe_graph(path, spec, str(dtype).removeprefix("torch."))
    return entry


def export_onnx(
    model: DeRIS,
    out: str | os.PathLike[str],
    options: ExportOptions,
    *,
    force: bool = False,
    progress: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export ``options.graphs`` of ``model`` into the directory ``out`` (see the module docstring)
    and return its path."""
    if model.query_sa != "per_sample":
        raise ExportError(f"only query_sa='per_sample' models are exported, got {model.query_sa!r}")
    out = Path(out)
    cfg = model.cfg
    topology = pipeline_topology(cfg, options.resolution)
    graphs = options.validate(topology.graph_names)
    specs = topology.graphs
    with staged_directory(out, force) as staging:
        entries: dict[str, Any] = {}
        bar = tqdm(graphs, desc="export", unit="graph", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            entries[name] = export_graph(model, specs[name], staging, options, external_data_threshold)
        bar.close()
        manifest = {
            "format_version": FORMAT_VERSION,
            "deris_version": deris.__version__,
            "preset": cfg.name,
            "weights": options.weights,
            "resolution": options.resolution,
            "mini_resolution": cfg.mini_image_size,
            "opset": OPSET,
            "msda": options.msda,
            "precision": options.precision,
            "max_text_len": cfg.max_text_len,
            "num_queries": cfg.num_queries,
            "hidden_dim": cfg.hidden_dim,
            "score_threshold": cfg.score_threshold,
            "batch": {"name": BATCH, "min": 1, "max": MAX_BATCH},
            "topology": topology.to_json(),
            "graphs": entries,
        }
        write_manifest(staging, manifest)
        if options.ort_optimized:
            optimize_export(staging, graphs, progress=progress)
    return out


def load_model(preset: str, checkpoint: str | os.PathLike[str] | None, seed: int = 0) -> DeRIS:
    """The model to export: ``checkpoint`` loaded into ``preset``, or seeded random weights."""
    if checkpoint is None:
        torch.manual_seed(seed)
        return deris.build_model(preset)
    if not Path(checkpoint).is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist or is not a file")
    try:
        return deris.from_checkpoint(preset, checkpoint)
    except deris.CheckpointError as e:
        raise ExportError(f"checkpoint {checkpoint} does not fit preset {preset}: {e}") from None
