"""Running an ONNX export directory in ONNX Runtime (CPU): one graph, or the whole model chained
as a server chains it (cognition and perception, then the fused decoder or the four rounds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from numpy.typing import NDArray
import onnxruntime

from deris.export.manifest import read_manifest
from deris.export.msda import plugin_session_options


def ort_session(path: Path, custom_ops: Sequence[str] = (), threads: int | None = None) -> onnxruntime.InferenceSession:
    """A CPU session for one graph; graphs with the TensorRT MSDA plugin node get its CPU kernel."""
    options = plugin_session_options() if custom_ops else onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPipeline:
    """The graphs of one export directory, with sessions opened on first use."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = read_manifest(self.directory)
        self.threads = threads
        self._sessions: dict[str, onnxruntime.InferenceSession] = {}

    def session(self, graph: str) -> onnxruntime.InferenceSession:
        if graph not in self.manifest["graphs"]:
            raise KeyError(f"{self.directory} has no graph {graph!r}; it has {', '.join(self.manifest['graphs'])}")
        if graph not in self._sessions:
            entry = self.manifest["graphs"][graph]
            self._sessions[graph] = ort_session(self.directory / entry["file"], entry["custom_ops"], self.threads)
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

    def __call__(self, inputs: dict[str, NDArray[Any]], per_round: bool = False) -> dict[str, NDArray[Any]]:
        """img, img_mini, token_ids, text_pad_mask -> final mask_logits (low-res), refer_logits,
        existence; through the fused ``decoder`` graph, or with ``per_round`` through round_0..3."""
        values = dict(inputs)
        values.update(self.run("cognition", values))
        values.update(self.run("perception", values))
        if not per_round:
            return self.run("decoder", values)
        values.update(self.run("round_0", values))
        for index in (1, 2, 3):
            values.update(query=values["query_out"], prev_mask_logits=values["mask_logits"], level_feature=values[f"ms{index - 1}"])
            values.update(self.run(f"round_{index}", values))
        return {name: values[name] for name in ("mask_logits", "refer_logits", "existence")}
