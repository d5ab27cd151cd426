"""Graph precision (``--precision fp32|fp16``).

fp16 graphs are exported from a half-precision copy of the wrappers, so PyTorch decides every
dtype the same way it does when the model runs in half (the BEiT-3 softmax and GELU, written in
float32, stay float32). Two things are then kept in float32 on purpose:

* MSDA: coordinates, bilinear weights and sums (``deris.export.msda`` casts around it);
* normalisation and softmax nodes (:data:`FLOAT32_OPS`), through a Cast pair around each. fp16
  LayerNorm is a known overflow source in TensorRT (docs/deployment.md, "Precision"), and the
  reductions inside these ops are where fp16 loses the most.

Inputs and outputs of fp16 graphs are float16 (token ids and the padding mask stay int64), so
the per-round graphs chain without casts.
"""

from __future__ import annotations

import copy

import onnx_ir as ir
import torch
from torch import nn

from deris.export.options import PRECISIONS, check_choice

FLOAT32_OPS = ("LayerNormalization", "Softmax", "InstanceNormalization", "GroupNormalization")


def check_precision(precision: str) -> str:
    return check_choice("precision", precision, PRECISIONS)


def float_dtype(precision: str) -> torch.dtype:
    """The dtype of a graph's float inputs and outputs."""
    return torch.float16 if check_precision(precision) == "fp16" else torch.float32


def for_precision(graph: nn.Module, precision: str) -> nn.Module:
    """The module to export: ``graph`` itself for fp32, a half-precision copy for fp16 (the
    original, shared with the other graphs and the reference, stays float32)."""
    return copy.deepcopy(graph).half() if check_precision(precision) == "fp16" else graph


def keep_in_float32(model: ir.Model, op_types: tuple[str, ...] = FLOAT32_OPS) -> int:
    """Run every float16 node of ``op_types`` in float32: Cast its float16 inputs up and its
    outputs back down. Returns the number of nodes changed."""
    graph = model.graph
    changed = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        if not any(value is not None and value.dtype == ir.DataType.FLOAT16 for value in node.inputs):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or value.dtype != ir.DataType.FLOAT16:
                continue
            up = ir.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{node.name}_in{index}_to_fp32")
            up.outputs[0].name = f"{node.name}_in{index}_fp32"
            up.outputs[0].dtype, up.outputs[0].shape = ir.DataType.FLOAT, value.shape
            graph.insert_before(node, up)
            node.replace_input_with(index, up.outputs[0])
        for index, out in enumerate(node.outputs):
            if out.dtype != ir.DataType.FLOAT16:
                continue
            users = list(out.uses())
            down = ir.node("Cast", [out], {"to": ir.DataType.FLOAT16}, name=f"{node.name}_out{index}_to_fp16")
            half = down.outputs[0]
            half.dtype, half.shape = ir.DataType.FLOAT16, out.shape
            graph.insert_after(node, down)
            for user, position in users:
                user.replace_input_with(position, half)
            if out.is_graph_output():
                # Graph outputs keep their names: the fp16 value takes over the original name.
                name = out.name
                out.name = f"{name}_fp32"
                half.name = name
                graph.outputs[graph.outputs.index(out)] = half
            else:
                half.name = f"{out.name}_fp16"
            out.dtype = ir.DataType.FLOAT
        changed += 1
    return changed
