"""DeRIS deployment export (installed as ``deris.export``).

* :mod:`~deris.export.options` — what an export may ask for (torch-free);
* :mod:`~deris.export.graphs` — the exported graphs: wrappers around the model's submodules, one
  per graph of :mod:`deris.topology`;
* :mod:`~deris.export.msda` — deformable attention as GridSample, as TensorRT's
  ``MultiscaleDeformableAttnPlugin_TRT`` node or as this project's Triton kernel
  (:mod:`~deris.export.triton_plugin`, an ahead-of-time TensorRT plugin), with CPU kernels for ONNX Runtime;
* :mod:`~deris.export.precision` — fp32 / fp16 graphs;
* :mod:`~deris.export.onnx_export` — writes an export directory atomically;
* :mod:`~deris.export.manifest` — ``manifest.json``, the directory's description;
* :mod:`~deris.export.runtime` — runs an export directory in ONNX Runtime;
* :mod:`~deris.export.verify` — parity of every graph with PyTorch;
* :mod:`~deris.export.ort_optimize` — ONNX Runtime graph optimisation of an export;
* :mod:`~deris.export.trt_preflight` — what TensorRT's ONNX parser will accept, checked without TensorRT;
* :mod:`~deris.export.tensorrt_build` — TensorRT engines from an export directory, checked after the build;
* :mod:`~deris.export.cli` — the ``deris-export`` command.
"""
