"""TensorRT FP16 engines from an ONNX export directory (TensorRT Python API; needs a GPU).

* fp16 exports are parsed as strongly typed networks: TensorRT then keeps exactly the graph's
  dtypes, including the float32 islands the exporter put around normalisation, softmax and MSDA.
* fp32 exports are built with the FP16 flag; normalisation and softmax layers are pinned to
  float32 (the overflow-prone layers, DEPLOYMENT_FACTS.md section 2).

``trt::MultiscaleDeformableAttnPlugin_TRT`` nodes resolve to TensorRT's built-in plugin (the
parser looks plugins up by op_type; ``init_libnvinfer_plugins`` registers them). One optimisation
profile per engine covers the batch axis; every other dimension is static.

The engines land in ``out`` as ``<graph>.plan`` with a ``manifest.json``: the ONNX manifest plus
``"tensorrt": {"version", "profile": {"min", "opt", "max"}, "engines": {graph: {"file",
"sha256", "bytes"}}}``. ``out`` is staged and renamed like the ONNX export.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from deris.export.manifest import read_manifest, sha256_file, write_manifest
from deris.atomic import staged_directory
from deris.cli_support import ToolError
from deris.export.options import ExportError

if TYPE_CHECKING:
    import tensorrt as trt


class TensorRTUnavailable(ToolError):
    """``import tensorrt`` failed: TensorRT is not installed in this environment."""


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailable(
            f"TensorRT is not installed here ({e}); building engines needs the TensorRT Python package "
            "(pip install tensorrt) and an NVIDIA GPU"
        ) from None
    return tensorrt


def _profile_shapes(shape: list[int | str], batch: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of one input: dynamic (named) dimensions are the batch axis."""
    return tuple(tuple(b if isinstance(d, str) else d for d in shape) for b in batch)


def _pin_float32(network: trt.INetworkDefinition, trt_module: Any) -> None:
    keep = {trt_module.LayerType.NORMALIZATION, trt_module.LayerType.SOFTMAX}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in keep:
            layer.precision = trt_module.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt_module.float32)


def build_engine(
    onnx_path: Path, entry: dict[str, Any], precision: str, batch: tuple[int, int, int], workspace_bytes: int, trt_module: Any
) -> bytes:
    """One serialized engine for one graph."""
    logger = trt_module.Logger(trt_module.Logger.WARNING)
    trt_module.init_libnvinfer_plugins(logger, "")
    builder: trt.Builder = trt_module.Builder(logger)
    strongly_typed = precision == "fp16"
    flags = 1 << int(trt_module.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network: trt.INetworkDefinition = builder.create_network(flags)
    parser: trt.OnnxParser = trt_module.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config: trt.IBuilderConfig = builder.create_builder_config()
    config.set_memory_pool_limit(trt_module.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not strongly_typed:
        config.set_flag(trt_module.BuilderFlag.FP16)
        config.set_flag(trt_module.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        _pin_float32(network, trt_module)
    profile = builder.create_optimization_profile()
    for tensor in entry["inputs"]:
        profile.set_shape(tensor["name"], *_profile_shapes(tensor["shape"], batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    return bytes(serialized)


def build_engines(
    onnx_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opt_batch: int = 1,
    max_batch: int | None = None,
    workspace_gib: float = 4.0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Build one engine per graph of the export in ``onnx_dir`` into the directory ``out``."""
    trt_module = import_tensorrt()
    onnx_dir, out = Path(onnx_dir), Path(out)
    manifest = read_manifest(onnx_dir)
    limit = manifest["batch"]["max"]
    max_batch = limit if max_batch is None else max_batch
    if not 1 <= opt_batch <= max_batch <= limit:
        raise ExportError(f"batch sizes must satisfy 1 <= opt ({opt_batch}) <= max ({max_batch}) <= {limit}")
    batch = (1, opt_batch, max_batch)
    engines: dict[str, Any] = {}
    with staged_directory(out, force) as staging:
        for name, entry in tqdm(manifest["graphs"].items(), desc="tensorrt", unit="engine", disable=not progress):
            path = staging / f"{name}.plan"
            path.write_bytes(
                build_engine(onnx_dir / entry["file"], entry, manifest["precision"], batch, int(workspace_gib * 2**30), trt_module)
            )
            engines[name] = {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest["tensorrt"] = {
            "version": trt_module.__version__,
            "onnx_dir": str(onnx_dir.resolve()),  # where the graphs' "file" entries live
            "profile": {"min": batch[0], "opt": batch[1], "max": batch[2]},
            "engines": engines,
        }
        write_manifest(staging, manifest)
    return out
