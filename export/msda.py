"""How the pixel decoder's multi-scale deformable attention (MSDA) appears in exported graphs.

Three representations (``--msda``; docs/deployment.md, "MSDA in graphs"):

* ``gridsample``: the reference's computation in standard ops, ONNX GridSample among them, laid
  out for graph runtimes (:func:`_gridsample_fused`; opset 18: TensorRT maps GridSample wrongly
  from opset 20 on).
* ``trt-plugin``: one ``trt::MultiscaleDeformableAttnPlugin_TRT`` node per deformable layer with
  NVIDIA's contract: value [B,S,H,D], spatial shapes [L,2] INT32, level start index [L] INT32,
  sampling locations [B,Q,H,L,P,2], softmaxed attention weights [B,Q,H,L,P] -> [B,Q,H,D]. The
  softmax and the location arithmetic stay ordinary graph ops in front of the node.
* ``triton-plugin``: one ``deris::msda_fused`` node per layer, this project's fused Triton kernel as
  an ahead-of-time TensorRT plugin (:mod:`deris.export.triton_plugin`).

In every representation MSDA computes in float32 (coordinates included) whatever the graph's
precision: an fp16 graph casts around it.

The model's deformable layers call ``deris.kernels.ms_deform_attn_fused`` unless
:func:`deris.modeling.pixel_decoder.msda_function` names another function for the current context;
:func:`msda_representation` uses that to swap in one of the implementations below for an export,
in the exporting thread only (the dynamo exporter traces in the calling thread). Running a
plugin graph on CPU needs :func:`plugin_session_options`, which registers an
onnxruntime-extensions kernel that computes the node with the project's reference.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

import deris.kernels as kernels
from deris.export import triton_plugin
from deris.export.options import MSDA_MODES
from deris.kernels.ms_deform_attn import (
    as_shape_list,
    head_level_images,
    ms_deform_attn_reference,
    sample_bilinear,
    sampling_inputs,
)
from deris.modeling.pixel_decoder import msda_function

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt"
# TensorRT's ONNX parser looks plugins up by op_type and reads these two attributes; the domain
# only keeps the ONNX checker happy (a default-domain node fails it).
PLUGIN_ATTRIBUTES = {"plugin_version": "1", "plugin_namespace": ""}


def check_msda_mode(mode: str) -> str:
    if mode not in MSDA_MODES:
        raise ValueError(f"unknown MSDA representation {mode!r}; accepted: {', '.join(MSDA_MODES)}")
    return mode


@torch.library.custom_op("deris_export::msda_trt_plugin", mutates_args=())
def msda_trt_plugin(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The TensorRT plugin's computation in PyTorch: inputs as the plugin takes them -> [B,Q,H,D]."""
    batch, _, heads, head_dim = value.shape
    out: torch.Tensor = ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return out.view(batch, -1, heads, head_dim)


@msda_trt_plugin.register_fake
def _msda_trt_plugin_fake(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads, head_dim)


def _gridsample_fused(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """The reference's softmax, locations and MSDA (``ms_deform_attn_fused_reference``), laid out
    for graph runtimes: the same products, summed level by level instead of over one concatenation.

    The query axis is innermost from the locations on: GridSample samples a [B*H, P, Q] grid into
    [B*H, D, P, Q], the attention weights multiply it as [B*H, 1, P, Q] and the points are summed
    over a middle axis. Every broadcast then runs over long contiguous spans and every transpose
    moves a single axis, which ONNX Runtime's CPU kernels do fast, and no [B*H, D, Q, L*P]
    concatenation is written (export/ort_optimize.py has the measurements). Per-level sums change
    only the order of the additions (tests/test_export_onnx.py holds it to the reference).
    """
    shapes = as_shape_list(spatial_shapes)
    batch, _, heads, head_dim = value.shape
    queries, levels, points = sampling_offsets.shape[1], sampling_offsets.shape[3], sampling_offsets.shape[4]
    # .float() is a no-op (no Cast node) for float32 graphs.
    offsets, reference_points = sampling_offsets.float(), reference_points.float()
    # Offsets are in pixels: x / width, y / height, as a constant of the offsets' trailing shape
    # [H, L, P, 2] so that the division broadcasts over whole rows.
    sizes = torch.tensor([(width, height) for height, width in shapes], dtype=torch.float32, device=value.device)
    sizes = sizes[None, :, None].expand(heads, levels, points, 2)
    # [B, H, L, P, Q, 2] in grid_sample's [-1, 1], the arithmetic of sampling_inputs and the reference.
    locations = reference_points.transpose(1, 2)[:, None, :, None] + (offsets / sizes).permute(0, 2, 3, 4, 1, 5)
    grids = 2 * locations - 1
    weights = attention_logits.float().softmax(-1).view(batch, queries, heads, levels, points).permute(0, 2, 3, 4, 1)
    per_level = []
    for level, image in enumerate(head_level_images(value.float(), shapes)):
        samples = sample_bilinear(image, grids[:, :, level].reshape(batch * heads, points, queries, 2))  # [B*H, D, P, Q]
        per_level.append((samples * weights[:, :, level].reshape(batch * heads, 1, points, queries)).sum(2))
    out = sum(per_level[1:], per_level[0])  # [B*H, D, Q]
    return out.view(batch, heads * head_dim, queries).transpose(1, 2).to(value.dtype)


def _plugin_fused(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    level_start_index: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    shapes = as_shape_list(spatial_shapes)
    locations, weights = sampling_inputs(shapes, reference_points.float(), sampling_offsets.float(), attention_logits.float())
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    # Python ints become int32 constants of the graph: the plugin rejects INT64.
    shapes_t = torch.tensor(shapes, dtype=torch.int32, device=value.device)
    starts_t = torch.tensor(starts, dtype=torch.int32, device=value.device)
    out: torch.Tensor = msda_trt_plugin(value.float(), shapes_t, starts_t, locations, weights)
    return out.flatten(2).to(value.dtype)


_IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gridsample": _gridsample_fused,
    "trt-plugin": _plugin_fused,
    "triton-plugin": triton_plugin.msda_fused,
}


@contextlib.contextmanager
def msda_representation(mode: str) -> Iterator[None]:
    """Within the block, deformable layers run in this context compute MSDA as ``mode`` exports it,
    and every other kernel call takes the plain-PyTorch path. Other threads are unaffected."""
    with msda_function(_IMPLEMENTATIONS[check_msda_mode(mode)]), kernels.backend("torch"):
        yield


@functools.cache
def _register_plugin_schema() -> None:
    """The dynamo exporter only emits ops whose ONNX schema is known; register the plugin's."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return
    param = OpSchema.FormalParameter
    onnx.defs.register_schema(
        OpSchema(
            PLUGIN_OP,
            PLUGIN_DOMAIN,
            1,
            inputs=[
                param("value", "T"),
                param("spatial_shapes", "I"),
                param("level_start_index", "I"),
                param("sampling_locations", "T"),
                param("attention_weights", "T"),
            ],
            outputs=[param("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("I", ["tensor(int32)"], "")],
            attributes=[OpSchema.Attribute(name, OpSchema.AttrType.STRING, "", required=False) for name in PLUGIN_ATTRIBUTES],
        )
    )


def custom_translation_table(mode: str) -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export``: maps the plugin op to its ONNX node."""
    if check_msda_mode(mode) == "triton-plugin":
        return triton_plugin.custom_translation_table()
    if mode != "trt-plugin":
        return {}
    import onnxscript

    _register_plugin_schema()
    trt = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)

    def plugin_node(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return getattr(trt, PLUGIN_OP)(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **PLUGIN_ATTRIBUTES
        )

    return {torch.ops.deris_export.msda_trt_plugin.default: plugin_node}


@functools.cache
def _register_ort_kernel() -> None:
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    @onnx_op(
        op_type=f"{PLUGIN_DOMAIN}::{PLUGIN_OP}",
        inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_int32, PyCustomOpDef.dt_float,
                PyCustomOpDef.dt_float],
        outputs=[PyCustomOpDef.dt_float],
        # Declared attributes must be present on every node; the exporter always writes both.
        attrs={name: PyCustomOpDef.dt_string for name in PLUGIN_ATTRIBUTES},
    )
    def _plugin_on_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, **_attrs):
        with torch.inference_mode():
            out = msda_trt_plugin(
                torch.from_numpy(value), torch.from_numpy(spatial_shapes), torch.from_numpy(level_start_index),
                torch.from_numpy(sampling_locations), torch.from_numpy(attention_weights),
            )
        return out.numpy()


def plugin_session_options(options: Any = None) -> Any:
    """ORT ``SessionOptions`` that can run the plugin nodes of both plugin representations on CPU
    (through onnxruntime-extensions and the project's reference MSDA)."""
    import onnxruntime
    from onnxruntime_extensions import get_library_path

    _register_ort_kernel()
    triton_plugin.register_ort_kernel()
    options = options if options is not None else onnxruntime.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
