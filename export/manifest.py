"""``manifest.json``: what an export directory holds, for the tools that consume it (the Triton
Inference Server repository generator, the TensorRT builder, the verifier).

Layout (``format_version`` 1)::

    {
      "format_version": 1, "deris_version": "0.1.0", "preset": "deris-b-grefcoco",
      "weights": "random" | "<checkpoint file name>",
      "resolution": 384, "mini_resolution": 224, "opset": 18,
      "msda": "gridsample" | "trt-plugin", "precision": "fp32" | "fp16",
      "max_text_len": 50, "num_queries": 20, "hidden_dim": 256, "score_threshold": 0.7,
      "batch": {"name": "batch", "min": 1, "max": 64},
      "graphs": {
        "<graph>": {
          "file": "<graph>.onnx",
          "files": [{"name": "<graph>.onnx", "sha256": "...", "bytes": 123}, ...],  # + "<graph>.onnx.data" if > 2 GB
          "custom_ops": ["trt::MultiscaleDeformableAttnPlugin_TRT"],  # nodes outside the ONNX standard
          "inputs": [{"name": "img", "dtype": "float32", "shape": ["batch", 3, 384, 384]}, ...],
          "outputs": [...]
        }, ...
      }
    }

Shapes list ints for static dimensions and the dimension's name (a string) for dynamic ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx

from deris.topology import GraphSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_entries(values: Any) -> list[dict[str, Any]]:
    entries = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        entries.append({"name": value.name, "dtype": dtype, "shape": shape})
    return entries


def describe_graph(path: Path, spec: GraphSpec, float_dtype: str) -> dict[str, Any]:
    """The manifest entry of one saved graph, checked against its contract (names, shapes, dtypes)."""
    model = onnx.load(str(path), load_external_data=False)
    inputs, outputs = _tensor_entries(model.graph.input), _tensor_entries(model.graph.output)
    for kind, actual, expected in (("inputs", inputs, spec.inputs), ("outputs", outputs, spec.outputs)):
        wanted = [
            {
                "name": t.name,
                "dtype": float_dtype if t.dtype == "float" else t.dtype,
                "shape": list(t.shape),
            }
            for t in expected
        ]
        if actual != wanted:
            raise RuntimeError(f"graph {spec.name}: exported {kind} {actual} differ from the contract {wanted}")
    files = [path] + sorted(path.parent.glob(f"{path.name}.data"))
    custom = sorted({f"{node.domain}::{node.op_type}" for node in model.graph.node if node.domain not in ("", "ai.onnx")})
    return {
        "file": path.name,
        "files": [{"name": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in files],
        "custom_ops": custom,
        "inputs": inputs,
        "outputs": outputs,
    }


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not an ONNX export directory: {MANIFEST_NAME} is missing") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    return manifest
