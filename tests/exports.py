"""The session's ONNX exports (conftest.py's ``tiny_export``, ``tiny_plugin_export``, ``demo_export``
and ``demo_fp16_export``; test_export_onnx.py's slow ``golden_b_export:MSDA``), made in background jobs
(tests/background.py) while the first tests run: ``python tests/exports.py JOB OUT``. Each takes one to
three single-threaded CPU-minutes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from background import Background

# The session fixtures whose exports this script makes: the MSDA representation of the tiny ones, the
# precision of the demo model's.
# conftest.py reads them at every session's start, so torch and deris are imported only on use.
TINY_EXPORTS = {"tiny_export": "gridsample", "tiny_plugin_export": "trt-plugin"}
DEMO_EXPORTS = {"demo_export": "fp32", "demo_fp16_export": "fp16"}
FIXTURES = (*TINY_EXPORTS, *DEMO_EXPORTS)
# deris-b-grefcoco with golden case A's weights at 384: every graph with GridSample MSDA, and only the
# perception graph with the plugin nodes, the one graph the representation changes (the tiny model's
# test_msda_mode_changes_only_the_perception_graph).
GOLDEN_B = "DERIS-B-grefcoco"
GOLDEN_B_EXPORTS = {"golden_b_export:gridsample": None, "golden_b_export:trt-plugin": ("perception",)}


def jobs(names: Iterable[str], directory: Path) -> dict[str, list[str]]:
    """Background jobs running this script, each writing into ``directory / name``."""
    return {name: [sys.executable, __file__, name, str(directory / name)] for name in names}


def exported(background: Background, job: str) -> Path:
    """The folder of a finished export job (tests/background.py); the test fails with its stderr if it failed."""
    result = background.result(job)
    assert result.returncode == 0, f"tests/exports.py {job} failed:\n{result.stderr[-6000:]}"
    return background.folder(job)


def tiny_model() -> Any:
    """deris-tiny with the tests' fixed random weights."""
    import torch
    from tis import PRESET

    import deris

    torch.manual_seed(0)
    return deris.build_model(PRESET)


def golden_b_model() -> Any:
    """deris-b-grefcoco with golden case A's weights (the synthetic rule through the official-key converter)."""
    from golden import golden_dir
    from synthetic_weights import load_manifest, official_state_dict

    import deris

    manifest = load_manifest(golden_dir() / f"manifest_{GOLDEN_B}.json")
    model = deris.build_model(GOLDEN_B)
    deris.load_checkpoint(model, official_state_dict(manifest, manifest["weight_salts"]["caseA"], model))
    return model


def export(fixture: str, out: Path) -> Path:
    from deris.export.onnx_export import ExportOptions, export_onnx

    if fixture in GOLDEN_B_EXPORTS:
        msda = fixture.partition(":")[2]
        options = ExportOptions(384, msda=msda, graphs=GOLDEN_B_EXPORTS[fixture], weights="golden")
        return export_onnx(golden_b_model(), out, options, progress=False)

    if fixture in DEMO_EXPORTS:  # fp32: as `deris-export onnx` makes it by default; fp16: the graphs the pipeline runs
        from deris.demo import demo_paths, load_demo_predictor

        model = load_demo_predictor().model
        precision = DEMO_EXPORTS[fixture]
        graphs = None if precision == "fp32" else ("cognition", "perception", "decoder")
        options = ExportOptions(model.cfg.image_size, precision=precision, graphs=graphs, weights=demo_paths()[0].name)
        return export_onnx(model, out, options, progress=False)
    model = tiny_model()
    options = ExportOptions(model.cfg.image_size, msda=TINY_EXPORTS[fixture], precision="fp32")
    return export_onnx(model, out, options, progress=False)


if __name__ == "__main__":
    export(sys.argv[1], Path(sys.argv[2]))
