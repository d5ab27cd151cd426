"""Triton python-backend model that runs one ONNX graph with ONNX Runtime on the CPU.

Used for every graph of a ``--backend python`` repository: it works with the tritonserver bundled
in the ``nvidia-pytriton`` wheel, which has no ONNX Runtime backend. It only needs numpy and
onnxruntime in the server's python environment.

The requests of one ``execute`` call (grouped by Triton's dynamic batcher) are concatenated along
the batch axis and run as one batch, then split back per request.

Config parameters: ``onnx_file`` (in the version folder), ``intra_op_threads`` and
``disabled_optimizers`` (ONNX Runtime's, ';'-separated; deris.export.ort_optimize says why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["intra_op_threads"])
        options.inter_op_num_threads = 1
        # Every graph model has its own pool on the same few cores: a pool spinning after its call
        # would hold up the next model in the ensemble (benchmarks: ~55 ms of ~80 ms chain overhead).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("optimization.disable_specified_optimizers", params.get("disabled_optimizers", ""))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = sorted(set(self.input_names) - graph_inputs) + sorted(set(self.output_names) - graph_outputs)
        if missing:
            raise ValueError(
                f"{path} has no tensors named {missing}; its inputs are {sorted(graph_inputs)}, outputs {sorted(graph_outputs)}"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds_per_request = [
            {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            for request in requests
        ]
        sizes = [len(feeds[self.input_names[0]]) for feeds in feeds_per_request]
        if len(requests) == 1:
            feeds = feeds_per_request[0]
        else:
            feeds = {name: np.concatenate([f[name] for f in feeds_per_request]) for name in self.input_names}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # answer every request of the batch instead of crashing the model
            error = pb_utils.TritonError(f"onnxruntime failed: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum([0, *sizes])
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, out[start:end]) for name, out in zip(self.output_names, outputs)]
            )
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
