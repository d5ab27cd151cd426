"""Everything Triton Inference Server for DeRIS (installed as ``deris.triton_repo``).

* :mod:`~deris.triton_repo.repository`: ``deris-export triton-repo``, the model-repository generator
  (every ``config.pbtxt`` built from Triton's own ``model_config_pb2`` messages);
* :mod:`~deris.triton_repo.server`: ``deris serve``, the ``tritonserver`` launcher;
* :mod:`~deris.triton_repo.client`: ``deris client``, the client of the ``deris`` ensemble (torch-free);
* ``models/<name>/model.py``: the python-backend models the generator copies into a repository as
  ``<model>/1/model.py``: ``preprocess`` (image bytes + expression -> model inputs; torch-free),
  ``postprocess`` (decoder outputs -> mask, scores, decision; no model, no kernels) and
  ``onnx_runner`` (one ONNX graph in ONNX Runtime, for ``--backend python``). They are not
  imported from here.
"""

from __future__ import annotations

from pathlib import Path

MODEL_SOURCES = ("preprocess", "postprocess", "onnx_runner")


def model_source(name: str) -> Path:
    """Path of the ``model.py`` of one of :data:`MODEL_SOURCES`."""
    if name not in MODEL_SOURCES:
        raise ValueError(f"unknown python-backend model {name!r}; available: {', '.join(MODEL_SOURCES)}")
    return Path(__file__).resolve().parent / "models" / name / "model.py"
