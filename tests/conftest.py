"""Session-wide test setup and fixtures.

``TRITON_INTERPRET=1`` must be set before deris is imported: Triton reads it when the kernels are
defined. The fixtures below are built lazily, once per run, by the tests that ask for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

pytest.register_assert_rewrite("tis")  # before its import: the helpers' asserts explain themselves

from spm import train_sentencepiece  # noqa: E402
from tis import MAX_BATCH_SIZE, PRESET, QUEUE_DELAY_US, TinyExport, free_port  # noqa: E402


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    import torch

    import deris
    from deris.export.onnx_export import ExportOptions, export_onnx

    folder = tmp_path_factory.mktemp("deris_tiny")
    torch.manual_seed(0)
    model = deris.build_model(PRESET)
    checkpoint = deris.save_checkpoint(model, folder / "deris_tiny.safetensors")
    onnx_dir = export_onnx(
        model, folder / "onnx", ExportOptions(model.cfg.image_size, msda="gridsample", precision="fp32"), progress=False
    )
    return TinyExport(checkpoint, onnx_dir, train_sentencepiece(folder / "spm"))


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model exported as ``deris-export onnx`` does by default (every graph at its
    preset's resolution, fp32, GridSample MSDA, ONNX Runtime's optimised graphs beside them)."""
    from deris.demo import demo_paths, load_demo_predictor
    from deris.export.onnx_export import ExportOptions, export_onnx

    model = load_demo_predictor().model
    options = ExportOptions(model.cfg.image_size, weights=demo_paths()[0].name)
    return export_onnx(model, tmp_path_factory.mktemp("deris_demo") / "onnx", options, progress=False)


@pytest.fixture(scope="session")
def python_repo(tiny_export: TinyExport, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deris.triton_repo.repository import generate_triton_repo

    return generate_triton_repo(
        tiny_export.onnx_dir,
        tmp_path_factory.mktemp("repo") / "python",
        "python",
        "rounds",
        spm_path=tiny_export.spm,
        max_batch_size=MAX_BATCH_SIZE,
        max_queue_delay_us=QUEUE_DELAY_US,
    )


@pytest.fixture(scope="session")
def triton_server(python_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from deris.triton_repo.server import TritonServer

    log_path = tmp_path_factory.mktemp("tritonserver") / "server.log"
    with open(log_path, "w") as log:
        server = TritonServer(python_repo, http_port=free_port(), grpc_port=free_port(), log=log)
        server.start()
        try:
            server.wait_ready(timeout=240)
            yield server
        finally:
            code = server.stop()
    assert code == 0, f"tritonserver exited with {code}; see {log_path}"


@pytest.fixture(scope="session")
def local_predictor(tiny_export: TinyExport) -> Any:
    from deris.predictor import Predictor

    return Predictor.from_checkpoint(PRESET, tiny_export.checkpoint, tiny_export.spm)
