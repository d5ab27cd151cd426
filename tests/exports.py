"""The session's ONNX exports (conftest.py's ``tiny_export``, ``tiny_plugin_export`` and
``demo_export``), made in background jobs (tests/background.py) while the first tests run:
``python tests/exports.py NAME OUT``. Each takes one to three single-threaded CPU-minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import deris
from deris.export.onnx_export import ExportOptions, export_onnx

TINY = "deris-tiny"


def tiny_model() -> deris.DeRIS:
    """deris-tiny with the tests' fixed random weights."""
    torch.manual_seed(0)
    return deris.build_model(TINY)


def export(name: str, out: Path) -> Path:
    if name == "demo":  # as `deris-export onnx` makes it by default
        from deris.demo import demo_paths, load_demo_predictor

        model = load_demo_predictor().model
        return export_onnx(model, out, ExportOptions(model.cfg.image_size, weights=demo_paths()[0].name), progress=False)
    msda = {"tiny": "gridsample", "tiny_plugin": "trt-plugin"}[name]
    model = tiny_model()
    return export_onnx(model, out, ExportOptions(model.cfg.image_size, msda=msda, precision="fp32"), progress=False)


if __name__ == "__main__":
    export(sys.argv[1], Path(sys.argv[2]))
