"""The session's ONNX exports (conftest.py's ``tiny_export``, ``tiny_plugin_export`` and
``demo_export``), made in background jobs (tests/background.py) while the first tests run:
``python tests/exports.py FIXTURE OUT``. Each takes one to three single-threaded CPU-minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# The session fixtures whose exports this script makes, and the MSDA representation of the tiny ones.
# conftest.py reads them at every session's start, so torch and deris are imported only on use.
TINY_EXPORTS = {"tiny_export": "gridsample", "tiny_plugin_export": "trt-plugin"}
FIXTURES = (*TINY_EXPORTS, "demo_export")


def tiny_model() -> Any:
    """deris-tiny with the tests' fixed random weights."""
    import torch
    from tis import PRESET

    import deris

    torch.manual_seed(0)
    return deris.build_model(PRESET)


def export(fixture: str, out: Path) -> Path:
    from deris.export.onnx_export import ExportOptions, export_onnx

    if fixture == "demo_export":  # as `deris-export onnx` makes it by default
        from deris.demo import demo_paths, load_demo_predictor

        model = load_demo_predictor().model
        return export_onnx(model, out, ExportOptions(model.cfg.image_size, weights=demo_paths()[0].name), progress=False)
    model = tiny_model()
    options = ExportOptions(model.cfg.image_size, msda=TINY_EXPORTS[fixture], precision="fp32")
    return export_onnx(model, out, options, progress=False)


if __name__ == "__main__":
    export(sys.argv[1], Path(sys.argv[2]))
