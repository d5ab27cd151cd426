"""DeRIS deployment export (installed as ``deris.export``).

* :mod:`~deris.export.graphs` — the exported graphs (wrappers around the model's submodules) and
  their I/O contract;
* :mod:`~deris.export.msda` — deformable attention as GridSample or as TensorRT's
  ``MultiscaleDeformableAttnPlugin_TRT`` node (and its CPU kernel for ONNX Runtime);
* :mod:`~deris.export.precision` — fp32 / fp16 graphs;
* :mod:`~deris.export.onnx_export` — writes an export directory atomically;
* :mod:`~deris.export.manifest` — ``manifest.json``, the directory's description;
* :mod:`~deris.export.runtime` — runs an export directory in ONNX Runtime;
* :mod:`~deris.export.verify` — parity of every graph with PyTorch;
* :mod:`~deris.export.tensorrt_build` — TensorRT engines from an export directory;
* :mod:`~deris.export.cli` — the ``deris-export`` command.
"""
