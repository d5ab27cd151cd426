"""Running an ONNX export directory in ONNX Runtime (CPU): one graph, or the whole model chained
as a server chains it (the topology recorded in the manifest: the encoders, then the rounds or the
fused decoder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from numpy.typing import NDArray

from deris.export.manifest import read_manifest
from deris.export.msda import plugin_session_options
from deris.export.ort_optimize import session_options
from deris.topology import GraphSpec, Topology, run_chain


def ort_session(path: Path, custom_ops: Sequence[str] = (), threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU session for one graph; graphs with plugin nodes get their CPU kernels. Thread pools do
    not spin after a call: the graphs of a chain share the same cores (export/ort_optimize.py)."""
    options = session_options(threads)
    if custom_ops:
        plugin_session_options(options)
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPipeline:
    """The graphs of one export directory, with sessions opened on first use. ``optimized``: run
    each graph's ONNX Runtime rewrite (``<graph>.opt.onnx``) where the export has one."""

    def __init__(self, directory: str | Path, threads: int | None = None, optimized: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = read_manifest(self.directory)
        self.topology = Topology.from_json(self.manifest["topology"])
        self.threads = threads
        self.optimized = optimized
        self._sessions: dict[str, onnxruntime.InferenceSession] = {}

    def session(self, graph: str) -> onnxruntime.InferenceSession:
        if graph not in self.manifest["graphs"]:
            raise KeyError(f"{self.directory} has no graph {graph!r}; it has {', '.join(self.manifest['graphs'])}")
        if graph not in self._sessions:
            entry = self.manifest["graphs"][graph]
            file = entry.get("optimized", entry)["file"] if self.optimized else entry["file"]
            self._sessions[graph] = ort_session(self.directory / file, entry["custom_ops"], self.threads)
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """Run one graph; float feeds are cast to the graph's float dtype, extra feeds are ignored."""
        entry = self.manifest["graphs"][graph]
        inputs = {}
        for tensor in entry["inputs"]:
            value = np.asarray(feeds[tensor["name"]])
            inputs[tensor["name"]] = value.astype(tensor["dtype"]) if value.dtype.kind == "f" else value
        outputs = self.session(graph).run(None, inputs)
        return {tensor["name"]: value for tensor, value in zip(entry["outputs"], outputs)}

    def __call__(self, inputs: dict[str, NDArray[Any]], layout: str = "fused") -> dict[str, NDArray[Any]]:
        """img, img_mini, token_ids, text_pad_mask -> the final mask_logits (low-res), refer_logits
        and existence, through the ``fused`` decoder graph or the ``rounds`` graphs."""

        def run(spec: GraphSpec, feeds: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
            return self.run(spec.name, feeds)

        values = run_chain(self.topology.layout(layout), run, inputs)
        return {name: values[value] for name, value in self.topology.final_values().items()}
