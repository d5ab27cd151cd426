"""Fixtures and helpers for the Triton Inference Server tests (``tests/test_triton_*.py``).

The session fixtures built on them live in ``conftest.py`` (so they exist once per test run):

* ``tiny_export``: deris-tiny with fixed random weights (``torch.manual_seed(0)``), saved as a
  checkpoint, exported to ONNX (gridsample MSDA, fp32, every graph), and a sentencepiece model;
* ``python_repo``: a ``--backend python`` repository generated from it;
* ``triton_server``: a real tritonserver (the one bundled in nvidia-pytriton) serving that
  repository on 127.0.0.1 with free ports; always stopped at the end of the session;
* ``local_predictor``: the PyTorch ``Predictor`` with the same weights and tokenizer.
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

PRESET = "deris-tiny"
# Gives the dynamic batcher a moment to group concurrent requests, so the batching tests see
# batches larger than one; a lone request waits at most this long per graph model.
QUEUE_DELAY_US = 2000
MAX_BATCH_SIZE = 16


@dataclass(frozen=True)
class TinyExport:
    checkpoint: Path
    onnx_dir: Path
    spm: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- images ----------------------------------------------------------------------------------


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    """An RGB / RGBA / gray uint8 array as encoded image bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def small(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` resized to (width, height): small images keep the tests fast."""
    return np.asarray(Image.fromarray(array).resize(size))


def synthetic_image(height: int = 72, width: int = 100) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = (200, 40, 40)
    image[height // 3 :, width // 3 :] = (30, 160, 220)
    return np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8)


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed): only the header is large."""
    data = bytearray(encode(np.zeros((1, 1, 3), np.uint8)))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- Triton model configs --------------------------------------------------------------------


def read_config(path: Path) -> Any:
    """Parse a config.pbtxt with Triton's own protobuf schema (raises on any unknown field)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def type_name(data_type: int) -> str:
    return str(model_config_pb2.DataType.Name(data_type))


def full_dims(config: Any, tensor: Any) -> tuple[int, ...]:
    """A tensor's shape with the batch axis, as the ensemble scheduler compares them."""
    return ((-1,) if config.max_batch_size > 0 else ()) + tuple(tensor.dims)


def check_ensemble(repo: Path, ensemble: str = "deris") -> dict[str, Any]:
    """Check that the ensemble's steps connect; return every model's parsed config.

    Every step input must be an ensemble input or an earlier step's output; every ensemble
    output must be produced; each step maps exactly its model's inputs and only existing
    outputs; producer and consumer agree on dtype and (full) shape; batching models allow the
    ensemble's batch size.
    """
    configs = {p.parent.name: read_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}
    for name, config in configs.items():
        assert config.name == name, f"{name}/config.pbtxt names itself {config.name!r}"
        assert (repo / name / "1").is_dir(), f"{name} has no version folder 1"
    top = configs[ensemble]
    assert top.platform == "ensemble"
    available = {t.name: (type_name(t.data_type), full_dims(top, t)) for t in top.input}
    for step in top.ensemble_scheduling.step:
        assert step.model_name in configs, f"step model {step.model_name} is not in the repository"
        model = configs[step.model_name]
        assert model.max_batch_size == 0 or model.max_batch_size >= top.max_batch_size, step.model_name
        inputs = {t.name: t for t in model.input}
        assert set(step.input_map) == set(inputs), f"{step.model_name}: maps {set(step.input_map)}, has {set(inputs)}"
        for key, tensor_name in step.input_map.items():
            assert tensor_name in available, f"{step.model_name} reads {tensor_name} before any step produces it"
            wanted = (type_name(inputs[key].data_type), full_dims(model, inputs[key]))
            assert available[tensor_name] == wanted, f"{step.model_name}.{key}: {available[tensor_name]} vs {wanted}"
        outputs = {t.name: t for t in model.output}
        for key, tensor_name in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            assert tensor_name not in available, f"ensemble tensor {tensor_name} is produced twice"
            available[tensor_name] = (type_name(outputs[key].data_type), full_dims(model, outputs[key]))
    for tensor in top.output:
        assert tensor.name in available, f"ensemble output {tensor.name} is never produced"
        assert available[tensor.name] == (type_name(tensor.data_type), full_dims(top, tensor)), tensor.name
    return configs
