"""Python-backend model code for the Triton Inference Server repository of DeRIS.

``deris-export triton-repo`` (``deris.export.triton_repo``) copies these files into a generated
repository as ``<model>/1/model.py``; they are not imported from here. Each folder holds one model:

* ``preprocess/model.py``: encoded image bytes + expression -> model inputs (``deris.preprocess``, ``deris.text``).
* ``postprocess/model.py``: final decoder outputs -> mask, scores, decision (``deris.postprocess``).
* ``onnx_runner/model.py``: runs one ONNX graph with ONNX Runtime on the CPU (``--backend python``).
"""

from __future__ import annotations

from pathlib import Path

MODEL_SOURCES = ("preprocess", "postprocess", "onnx_runner")


def model_source(name: str) -> Path:
    """Path of the ``model.py`` of one of :data:`MODEL_SOURCES`."""
    if name not in MODEL_SOURCES:
        raise ValueError(f"unknown python-backend model {name!r}; available: {', '.join(MODEL_SOURCES)}")
    return Path(__file__).resolve().parent / name / "model.py"
