"""What an export request may ask for, checked before any heavy work (and without torch, so that
``deris-export --help`` and argument errors are instant)."""

from __future__ import annotations

from dataclasses import dataclass

from deris.topology import LEVEL_STRIDES

# How multi-scale deformable attention appears in the graphs (docs/deployment.md, "MSDA in graphs").
MSDA_MODES = ("gridsample", "trt-plugin", "triton-plugin")
PRECISIONS = ("fp32", "fp16")


class ExportError(ValueError):
    """A request that cannot be exported; the message says what was wrong and what is accepted."""


def check_choice(what: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ExportError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")
    return value


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % LEVEL_STRIDES[0]:
        raise ExportError(f"resolution must be a positive multiple of {LEVEL_STRIDES[0]} (e.g. 384), got {resolution!r}")
    return resolution


@dataclass(frozen=True)
class ExportOptions:
    resolution: int
    msda: str = "gridsample"
    precision: str = "fp32"
    graphs: tuple[str, ...] | None = None  # None: every graph of the topology
    weights: str = "random"  # recorded in the manifest: "random" or the checkpoint's file name
    # Also write ONNX Runtime's offline-optimised <graph>.opt.onnx beside each graph (export/ort_optimize.py).
    ort_optimize: bool = True

    @property
    def ort_optimized(self) -> bool:
        """Whether the export gets the optimised graphs: fp32 only, the precision ONNX Runtime runs on
        the CPU (fp16 graphs are TensorRT's input, and TensorRT reads the plain graphs)."""
        return self.ort_optimize and self.precision == "fp32"

    def validate(self, graph_names: tuple[str, ...]) -> tuple[str, ...]:
        """Check the options against the model's graphs; return the graphs to export."""
        check_resolution(self.resolution)
        check_choice("MSDA representation", self.msda, MSDA_MODES)
        check_choice("precision", self.precision, PRECISIONS)
        graphs = graph_names if self.graphs is None else self.graphs
        unknown = [g for g in graphs if g not in graph_names]
        if unknown or not graphs:
            raise ExportError(f"unknown graph name(s) {unknown or '(none given)'}; accepted: {', '.join(graph_names)}")
        return tuple(g for g in graph_names if g in graphs)
