"""Export a DeRIS model to a directory of ONNX graphs plus ``manifest.json``.

The directory is written as a hidden sibling (``.<name>.partial-*``) and renamed into place once
every graph and the manifest are written, so ``out`` is either complete or absent, also when the
export fails or is interrupted (Ctrl-C). With ``force`` an existing ``out`` is replaced only at
that final step. (A process killed outright, e.g. SIGKILL, can leave the hidden staging directory
behind, but never a half-written ``out``.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

import deris
from deris.config import DerisConfig
from deris.export.graphs import BATCH, GRAPH_NAMES, MAX_BATCH, GraphSpec, build_graph, example_inputs, graph_specs
from deris.export.manifest import FORMAT_VERSION, describe_graph, write_manifest
from deris.export.msda import check_msda_mode, custom_translation_table, msda_representation
from deris.export.precision import check_precision, float_dtype, for_precision, keep_in_float32
from deris.modeling.deris import DeRIS

# Opset 18: the dynamo exporter's lowest, and below 20, where TensorRT misreads GridSample.
OPSET = 18
# Protobuf cannot serialise 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
# Tracing with batch 2: batch 1 would let the tracer specialise size-1 dimensions.
TRACE_BATCH = 2


class ExportError(ValueError):
    """A request that cannot be exported; the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class ExportOptions:
    resolution: int
    msda: str = "gridsample"
    precision: str = "fp32"
    graphs: tuple[str, ...] = GRAPH_NAMES
    weights: str = "random"  # recorded in the manifest: "random" or the checkpoint's file name

    def validate(self) -> None:
        check_resolution(self.resolution)
        try:
            check_msda_mode(self.msda)
            check_precision(self.precision)
        except ValueError as e:
            raise ExportError(str(e)) from None
        unknown = [g for g in self.graphs if g not in GRAPH_NAMES]
        if unknown or not self.graphs:
            raise ExportError(f"unknown graph name(s) {unknown or '(none given)'}; accepted: {', '.join(GRAPH_NAMES)}")


def check_resolution(resolution: int) -> int:
    if resolution <= 0 or resolution % 32:
        raise ExportError(f"resolution must be a positive multiple of 32 (e.g. 384), got {resolution}")
    return resolution


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an output that exists (unless ``force``) or whose parent cannot take a new directory."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output path {out} exists and is not a directory")
    if out.exists() and not force:
        raise ExportError(f"output directory {out} already exists; pass --force to replace it")
    # Try it rather than trust permission bits (root ignores them; read-only mounts do not).
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"cannot write the output directory {out}: {e.strerror} ({e.filename})") from None


@contextlib.contextmanager
def staged_directory(out: Path, force: bool) -> Iterator[Path]:
    """A fresh hidden sibling of ``out`` to write into; renamed to ``out`` when the block succeeds,
    deleted when it raises (KeyboardInterrupt included)."""
    check_output_dir(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        # mkdtemp makes the directory private (0700); give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        yield staging
        if out.exists():
            if not force:
                raise ExportError(f"output directory {out} appeared during the export; pass --force to replace it")
            retired = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, retired)
            os.rename(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    module = for_precision(build_graph(spec.name, model), options.precision)
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
    options.validate()
    if model.query_sa != "per_sample":
        raise ExportError(f"only query_sa='per_sample' models are exported, got {model.query_sa!r}")
    out = Path(out)
    cfg = model.cfg
    specs = graph_specs(cfg, options.resolution)
    with staged_directory(out, force) as staging:
        entries: dict[str, Any] = {}
        bar = tqdm(options.graphs, desc="export", unit="graph", disable=not progress)
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
            "graphs": entries,
        }
        write_manifest(staging, manifest)
    return out


def preset_config(preset: str) -> DerisConfig:
    try:
        return deris.get_config(preset)
    except ValueError as e:
        raise ExportError(str(e)) from None


def load_model(preset: str, checkpoint: str | os.PathLike[str] | None, seed: int = 0) -> DeRIS:
    """The model to export: ``checkpoint`` loaded into ``preset``, or seeded random weights."""
    preset_config(preset)
    if checkpoint is None:
        torch.manual_seed(seed)
        return deris.build_model(preset)
    if not Path(checkpoint).is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist or is not a file")
    try:
        return deris.from_checkpoint(preset, checkpoint)
    except deris.CheckpointError as e:
        raise ExportError(f"checkpoint {checkpoint} does not fit preset {preset}: {e}") from None
