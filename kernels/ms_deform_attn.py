"""Multi-scale deformable attention (MSDA), as in Deformable-DETR / Mask2Former's pixel decoder.

Contract (the one shared by the official CUDA op, TensorRT's MultiscaleDeformableAttnPlugin_TRT
and this module):

    value               [B, S, H, D]      S = sum_l H_l * W_l, levels concatenated in order
    spatial_shapes      [L, 2]            (H_l, W_l) per level; a tensor or a sequence of pairs
    level_start_index   [L]               offset of each level inside S
    sampling_locations  [B, Q, H, L, P, 2] normalised (x, y) in [0, 1] (outside means zero padding)
    attention_weights   [B, Q, H, L, P]   already softmaxed over (L, P)
    ->                  [B, Q, H * D]

Sampling is bilinear with zero padding and align_corners=False, i.e.
grid_sample(value_l, 2 * loc - 1).

Two implementations of the contract live here: the plain-PyTorch references and Triton kernels
(:func:`ms_deform_attn_triton`, and :func:`ms_deform_attn_fused_triton`, which also does the
softmax and the location arithmetic of :func:`sampling_inputs`), with backward passes.

The Triton entries go through custom operators, ``torch.ops.deris_kernels.msda_forward`` /
``msda_backward`` and ``msda_fused_forward`` / ``msda_fused_backward``, made with
``torch.library.triton_op``: torch.compile, torch.export and AOTInductor see them (and, on a GPU,
the kernels inside) without a graph break. Traced on CPU, their bodies run the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._triton_support import (
    INTERPRETING,
    TRITON_AVAILABLE,
    check_deterministic,
    check_float,
    check_same_device,
    check_shape,
    gradient_like,
    jit,
    launch,
    launch_tuned,
    reference_vjp,
    require_triton,
    skipped_gradient,
    tl,
    traced_on_cpu,
    triton,
    triton_op,
)

SpatialShapes = torch.Tensor | Sequence[tuple[int, int]]


def as_shape_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """Level sizes as Python ints (static under tracing and export).

    Reading a CUDA tensor's values waits for the device: callers that care (the pixel decoder,
    anything captured in a CUDA graph) pass Python ints.
    """
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError("spatial_shapes is a CUDA tensor, whose values cannot be read during CUDA graph "
                             "capture; pass the level sizes as a sequence of (height, width) ints")
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def head_level_images(value: torch.Tensor, spatial_shapes: SpatialShapes) -> list[torch.Tensor]:
    """value [B, S, H, D] as grid_sample images, one channel-first image per (image, head) and
    level: [B*H, D, H_l, W_l] for each level l."""
    batch, _, heads, head_dim = value.shape
    shapes = as_shape_list(spatial_shapes)
    images = value.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, -1)
    return [image.unflatten(-1, size) for image, size in zip(images.split([h * w for h, w in shapes], dim=-1), shapes)]


def sample_bilinear(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The contract's sampling: bilinear, zero outside the map, with ``grid`` = 2 * location - 1
    (grid_sample's [-1, 1], which align_corners=False maps onto [0, 1] linearly)."""
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Plain-PyTorch MSDA: one grid_sample per level for all heads, then one batched contraction.

    ``level_start_index`` is implied by the shapes and not read. Computes in the widest dtype of
    the three float inputs (so float32 locations keep their precision next to float16 values) and
    returns value's dtype. Exportable as ONNX GridSample + MatMul, and differentiable.
    """
    batch, _, heads, head_dim = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    grids = (2 * sampling_locations.to(dtype) - 1).transpose(1, 2).reshape(batch * heads, queries, levels, points, 2)
    # [B*H, D, Q, L*P]: the bilinear sample of every (level, point), levels side by side.
    samples = torch.cat([sample_bilinear(image, grids[:, :, level])
                         for level, image in enumerate(head_level_images(value.to(dtype), spatial_shapes))], dim=-1)
    # out[n, q, d] = sum over k = (level, point) of samples[n, d, q, k] * weights[n, q, k].
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(batch * heads, queries, levels * points)
    out = torch.einsum("ndqk,nqk->nqd", samples, weights)
    return out.unflatten(0, (batch, heads)).transpose(1, 2).reshape(batch, queries, heads * head_dim).to(value.dtype)


def sampling_inputs(
    spatial_shapes: SpatialShapes,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn the raw projections of a deformable-attention layer into the MSDA contract's inputs.

    reference_points   [B, Q, L, 2]          normalised (x, y) per level
    sampling_offsets   [B, Q, H, L, P, 2]    in pixels of each level
    attention_logits   [B, Q, H, L * P]      before the softmax over (L, P)
    -> sampling_locations [B, Q, H, L, P, 2] in the wider dtype of the first two,
       attention_weights  [B, Q, H, L, P]    in the logits' dtype
    """
    shapes = as_shape_list(spatial_shapes)
    batch, queries, heads, levels, points, _ = sampling_offsets.shape
    dtype = torch.promote_types(reference_points.dtype, sampling_offsets.dtype)
    # Offsets are in pixels: x is normalised by the level's width, y by its height. Python-number
    # divisors are graph constants; a tensor of them would be a host-to-device copy every call.
    offsets = sampling_offsets.to(dtype)
    normalised = torch.stack([
        torch.stack((offsets[:, :, :, level, :, 0] / width, offsets[:, :, :, level, :, 1] / height), dim=-1)
        for level, (height, width) in enumerate(shapes)
    ], dim=3)
    locations = reference_points.to(dtype)[:, :, None, :, None, :] + normalised
    weights = attention_logits.softmax(-1).view(batch, queries, heads, levels, points)
    return locations, weights


def ms_deform_attn_fused_reference(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    msda=ms_deform_attn_reference,
) -> torch.Tensor:
    """Softmax + location arithmetic + MSDA, as the pixel decoder's layers compute them."""
    locations, weights = sampling_inputs(spatial_shapes, reference_points, sampling_offsets, attention_logits)
    return msda(value, spatial_shapes, level_start_index, locations, weights)


# ---------------------------------------------------------------------------------------------
# Triton kernels
#
# Coordinates, interpolation weights and sums are fp32 whatever the storage dtype. value rows are
# [B, S, H, D]: row (b, s) of head h starts at ((b * S + s) * H + h) * D.
#
# Forward: one lane per query. A program covers BLOCK_Q queries of one (batch, head); each lane
# does its query's per-point work (location, floor, corner weights and addresses) once, then gathers
# the head's D channels of each corner as NUM_CHUNKS loads of CHUNK channels (16 bytes: 8 fp16 or
# 4 fp32), all held by that lane: a (NUM_CHUNKS, BLOCK_Q, CHUNK) tile whose first axis stays in
# registers. Lanes sharing a query would repeat the per-point work, which is most of the
# instructions when the channels are few (32 per head in DeRIS).
#
# Backward: the same layout and sampling code, run backwards: per corner, one dot product of the
# query's output gradient with the gathered channels (for the weight and location gradients) and,
# when value needs a gradient, one 16-byte float32 vector atomic per 4 channels (other queries and
# heads add to the same keys). Chunks are 4 channels whatever the storage dtype, the atomics' width.
# ---------------------------------------------------------------------------------------------


@jit
def _axis_neighbours(pixel, last_first, reach):
    """Along one axis, the lower of the two neighbours a sample reads, and both
    interpolation weights, for an fp32 pixel coordinate.

    The lower neighbour is clamped to [0, last_first] (last_first = max(size - 2, 0)), so both
    neighbours are inside the level and every load is unmasked and in bounds, with no per-corner
    test or select. The weights are tent functions of the distance to each neighbour, zero for a
    neighbour the clamp moved away, which is what zero padding asks: for a coordinate in
    [0, size - 1] they are exactly 1 - frac and frac, in [-1, 0) and (size - 1, size) only the
    neighbour inside weighs, and beyond both weigh zero. ``reach`` is 2 on an axis of two or more
    pixels and -inf on one of a single pixel, whose second neighbour then weighs zero. A NaN
    coordinate weighs zero (max and min return the non-NaN operand).
    """
    lower = tl.minimum(tl.maximum(tl.floor(pixel), 0.0), last_first)
    distance = pixel - lower
    # The second weight is not 1 - |distance - 1|, which rounds a tiny distance away; reach -
    # distance is exact where it is the minimum (distance in [1, 2), the right border).
    return (lower.to(tl.int32), distance, tl.maximum(1.0 - tl.abs(distance), 0.0),
            tl.maximum(tl.minimum(distance, reach - distance), 0.0))


@jit
def _tent_slopes(distance, first_weight, second_weight):
    """d(weight)/d(pixel) of both weights of _axis_neighbours: +-1 where a weight is positive
    (rising towards its neighbour), 0 where it is zero (the location gradient of zero padding)."""
    return (tl.where(first_weight > 0.0, tl.where(distance < 0.0, 1.0, -1.0), 0.0),
            tl.where(second_weight > 0.0, tl.where(distance < 1.0, 1.0, -1.0), 0.0))


@jit
def _gather(pointers, channels, HEAD_DIM: tl.constexpr, PADDED: tl.constexpr):
    """(NUM_CHUNKS, BLOCK_Q, CHUNK) fp32 channels at ``pointers`` (one key per query)."""
    pointers = pointers[None, :, None] + channels
    if PADDED:  # HEAD_DIM is not NUM_CHUNKS * CHUNK: the last chunks are partly past the head
        return tl.load(pointers, mask=channels < HEAD_DIM, other=0.0).to(tl.float32)
    return tl.load(pointers).to(tl.float32)


@jit
def _level_scalars(levels_ptr, level, row_stride, NARROW: tl.constexpr):
    """What the samples of one level share (forward and backward): the offset of its first key (in elements,
    from the head's), its size, the clamp limits and reaches of _axis_neighbours, and the offsets
    from a key to its right and lower neighbours. Only NARROW (a level one pixel high or wide)
    needs them computed: there an axis of one pixel has a second neighbour of weight zero, read at
    offset 0 to stay in bounds."""
    height = tl.load(levels_ptr + 3 * level)
    width = tl.load(levels_ptr + 3 * level + 1)
    first_key = tl.load(levels_ptr + 3 * level + 2).to(tl.int64) * row_stride
    last_x = tl.maximum(width - 2, 0).to(tl.float32)
    last_y = tl.maximum(height - 2, 0).to(tl.float32)
    if NARROW:
        scalars = (width, last_x, last_y, tl.where(width > 1, 2.0, float("-inf")),
                   tl.where(height > 1, 2.0, float("-inf")), tl.where(width > 1, row_stride, 0),
                   tl.where(height > 1, width * row_stride, 0))
    else:
        scalars = (width, last_x, last_y, 2.0, 2.0, row_stride, width * row_stride)
    return first_key, height, width, scalars


@jit
def _accumulate_sample(acc, level_ptr, x, y, level, weight, row_stride, channels,
                       HEAD_DIM: tl.constexpr, PADDED: tl.constexpr, NARROW: tl.constexpr):
    """acc + weight * bilinear sample at pixel coordinates (x, y), per query of the block.

    ``level`` holds the per-level scalars of _level_scalars. Without NARROW (every level at least
    2 x 2) the right neighbour is the next key, a constant offset the loads take as an immediate.
    """
    width, last_x, last_y, reach_x, reach_y, x_step, y_step = level
    x0, _, wx0, wx1 = _axis_neighbours(x, last_x, reach_x)
    y0, _, wy0, wy1 = _axis_neighbours(y, last_y, reach_y)
    top_weight = weight * wy0
    bottom_weight = weight * wy1
    # Keys within a level number < 2^31 / row_stride (checked by the launcher): int32 offsets suffice.
    top_left = level_ptr + (y0 * width + x0).to(tl.int64) * row_stride
    bottom_left = top_left + y_step
    top_right = top_left + x_step
    bottom_right = bottom_left + x_step
    acc += (top_weight * wx0)[None, :, None] * _gather(top_left, channels, HEAD_DIM, PADDED)
    acc += (top_weight * wx1)[None, :, None] * _gather(top_right, channels, HEAD_DIM, PADDED)
    acc += (bottom_weight * wx0)[None, :, None] * _gather(bottom_left, channels, HEAD_DIM, PADDED)
    acc += (bottom_weight * wx1)[None, :, None] * _gather(bottom_right, channels, HEAD_DIM, PADDED)
    return acc


@jit
def _program_setup(num_keys, num_queries, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """What every kernel of one lane per query starts from: the (batch, head) of the program, its
    queries' rows in [B, Q, H] (past-the-end queries clamped to the last one, so that their loads
    stay in bounds; only stores and atomics are masked), the offset of the head's first value
    element and the channel offsets."""
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    queries = batch.to(tl.int64) * num_queries + tl.minimum(q, num_queries - 1)
    head_offset = batch.to(tl.int64) * num_keys * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
    channels = tl.arange(0, NUM_CHUNKS)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]
    return queries, queries * NUM_HEADS + head, q_mask, head_offset, channels


@jit
def _load_pairs(pairs_ptr, index):
    """fp32 (x, y) of the pairs ``index`` of a [..., 2] tensor, read as one load per query."""
    pair = tl.load(pairs_ptr + 2 * index[:, None] + tl.arange(0, 2)[None, :]).to(tl.float32)
    return tl.split(pair)


@jit
def _pixel_pairs(pairs_ptr, index, width, height):
    """The normalised (x, y) pairs ``index`` of a [..., 2] tensor as pixel coordinates of a level:
    align_corners=False puts pixel centres at normalised (i + 0.5) / size."""
    x, y = _load_pairs(pairs_ptr, index)
    return x * width.to(tl.float32) - 0.5, y * height.to(tl.float32) - 0.5


@jit
def _corner_backward(level_ptr, grad_level_ptr, offsets, grad_out, corner_weight, q_mask, channels,
                     HEAD_DIM: tl.constexpr, PADDED: tl.constexpr, VALUE_GRAD: tl.constexpr):
    """sum over channels of grad_out * value at one corner per query (``offsets`` from the level's
    first element); with VALUE_GRAD, adds corner_weight * grad_out to that corner's value gradient
    (atomics: other queries and heads hit the same keys). A past-the-end query (clamped to the
    last one) adds zeros: unmasked vector atomics need no branch around each."""
    dot = tl.sum(tl.sum(grad_out * _gather(level_ptr + offsets, channels, HEAD_DIM, PADDED), axis=2), axis=0)
    if VALUE_GRAD:
        pointers = grad_level_ptr + offsets[None, :, None] + channels
        scaled = grad_out * tl.where(q_mask, corner_weight, 0.0)[None, :, None]
        if PADDED:
            tl.atomic_add(pointers, scaled, mask=channels < HEAD_DIM, sem="relaxed")
        else:
            tl.atomic_add(pointers, scaled, sem="relaxed")
    return dot


@jit
def _sample_backward(level_ptr, grad_level_ptr, x, y, level, weight, grad_out, q_mask, row_stride, channels,
                     HEAD_DIM: tl.constexpr, PADDED: tl.constexpr, VALUE_GRAD: tl.constexpr):
    """Backward of ``weight * bilinear sample at (x, y)`` (the forward's _accumulate_sample) for one
    point per query: scatters d(loss)/d(value) with VALUE_GRAD; returns d(loss)/d(weight) and
    d(loss)/d(x, y) in pixels."""
    width, last_x, last_y, reach_x, reach_y, x_step, y_step = level
    x0, distance_x, wx0, wx1 = _axis_neighbours(x, last_x, reach_x)
    y0, distance_y, wy0, wy1 = _axis_neighbours(y, last_y, reach_y)
    top_left = (y0 * width + x0).to(tl.int64) * row_stride
    top_weight = weight * wy0
    bottom_weight = weight * wy1
    dot00 = _corner_backward(level_ptr, grad_level_ptr, top_left, grad_out, top_weight * wx0, q_mask, channels,
                             HEAD_DIM, PADDED, VALUE_GRAD)
    dot01 = _corner_backward(level_ptr, grad_level_ptr, top_left + x_step, grad_out, top_weight * wx1, q_mask,
                             channels, HEAD_DIM, PADDED, VALUE_GRAD)
    dot10 = _corner_backward(level_ptr, grad_level_ptr, top_left + y_step, grad_out, bottom_weight * wx0, q_mask,
                             channels, HEAD_DIM, PADDED, VALUE_GRAD)
    dot11 = _corner_backward(level_ptr, grad_level_ptr, top_left + y_step + x_step, grad_out, bottom_weight * wx1,
                             q_mask, channels, HEAD_DIM, PADDED, VALUE_GRAD)
    slope_x0, slope_x1 = _tent_slopes(distance_x, wx0, wx1)
    slope_y0, slope_y1 = _tent_slopes(distance_y, wy0, wy1)
    top = wx0 * dot00 + wx1 * dot01
    bottom = wx0 * dot10 + wx1 * dot11
    grad_x = weight * (wy0 * (slope_x0 * dot00 + slope_x1 * dot01) + wy1 * (slope_x0 * dot10 + slope_x1 * dot11))
    return wy0 * top + wy1 * bottom, grad_x, weight * (slope_y0 * top + slope_y1 * bottom)


@jit
def _store_pairs(pairs_ptr, index, x, y, mask):
    """Store (x, y) into the pairs ``index`` of a [..., 2] tensor, one store per query."""
    tl.store(pairs_ptr + 2 * index[:, None] + tl.arange(0, 2)[None, :],
             tl.join(x, y).to(pairs_ptr.dtype.element_ty), mask=mask[:, None])


@jit
def _softmax_scale(logits_ptr, entries, NUM_LP: tl.constexpr):
    """The max and the inverse sum of exponentials of each query's NUM_LP logits from ``entries``:
    prob_k = exp(logit_k - max) * inverse. Two passes over the logits, each lane over its own
    query's; the sampling loop then recomputes each exponential (the logits come from L1 the
    second time), cheaper than keeping an (L * P)-wide tile."""
    top = tl.load(logits_ptr + entries).to(tl.float32)
    for lp in tl.static_range(1, NUM_LP):
        top = tl.maximum(top, tl.load(logits_ptr + entries + lp).to(tl.float32))
    total = tl.zeros(top.shape, dtype=tl.float32)
    for lp in tl.static_range(NUM_LP):
        total += tl.exp(tl.load(logits_ptr + entries + lp).to(tl.float32) - top)
    return top, 1.0 / total


@jit
def _forward_store(out_ptr, query_rows, q_mask, acc, channels, HEAD_DIM: tl.constexpr):
    tl.store(out_ptr + (query_rows * HEAD_DIM)[None, :, None] + channels, acc.to(out_ptr.dtype.element_ty),
             mask=q_mask[None, :, None] & (channels < HEAD_DIM))


@jit
def _msda_forward_kernel(
    value_ptr, levels_ptr, locations_ptr, weights_ptr, out_ptr,
    num_keys, num_queries, query_bucket,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
):
    _, query_rows, q_mask, head_offset, channels = _program_setup(num_keys, num_queries, NUM_HEADS, HEAD_DIM,
                                                                  BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    # First (level, point) entry of each query's row in the [B, Q, H, L, P] weights.
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    acc = tl.zeros((NUM_CHUNKS, BLOCK_Q, CHUNK), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_ptr = value_ptr + head_offset + first_key
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            x, y = _pixel_pairs(locations_ptr, entry, width, height)
            weight = tl.load(weights_ptr + entry).to(tl.float32)
            acc = _accumulate_sample(acc, level_ptr, x, y, scalars, weight, row_stride, channels, HEAD_DIM,
                                     padded, NARROW)
    _forward_store(out_ptr, query_rows, q_mask, acc, channels, HEAD_DIM)


@jit
def _msda_backward_kernel(
    value_ptr, levels_ptr, locations_ptr, weights_ptr, grad_out_ptr,
    grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_keys, num_queries,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
):
    _, query_rows, q_mask, head_offset, channels = _program_setup(num_keys, num_queries, NUM_HEADS, HEAD_DIM,
                                                                  BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    grad_out = _gather(grad_out_ptr + query_rows * HEAD_DIM, channels, HEAD_DIM, padded)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_offset = head_offset + first_key
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            x, y = _pixel_pairs(locations_ptr, entry, width, height)
            weight = tl.load(weights_ptr + entry).to(tl.float32)
            grad_weight, grad_x, grad_y = _sample_backward(
                value_ptr + level_offset, grad_value_ptr + level_offset, x, y, scalars, weight, grad_out, q_mask,
                row_stride, channels, HEAD_DIM, padded, VALUE_GRAD)
            # x = loc_x * width - 0.5, so d(loss)/d(loc_x) = width * d(loss)/d(x).
            _store_pairs(grad_locations_ptr, entry, grad_x * width.to(tl.float32), grad_y * height.to(tl.float32),
                         q_mask)
            tl.store(grad_weights_ptr + entry, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=q_mask)


@jit
def _msda_fused_forward_kernel(
    value_ptr, levels_ptr, reference_ptr, offsets_ptr, logits_ptr, out_ptr,
    num_keys, num_queries, query_bucket,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
):
    queries, query_rows, q_mask, head_offset, channels = _program_setup(num_keys, num_queries, NUM_HEADS, HEAD_DIM,
                                                                        BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    top, inverse_total = _softmax_scale(logits_ptr, entries, NUM_LEVELS * NUM_POINTS)

    acc = tl.zeros((NUM_CHUNKS, BLOCK_Q, CHUNK), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_ptr = value_ptr + head_offset + first_key
        # reference_points is [B, Q, L, 2]: shared by the heads. loc = ref + offset / size, so the
        # pixel coordinate loc * size - 0.5 is ref * size + offset - 0.5 (no division).
        ref_x, ref_y = _pixel_pairs(reference_ptr, queries * NUM_LEVELS + level, width, height)
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            offset_x, offset_y = _load_pairs(offsets_ptr, entry)
            x = ref_x + offset_x
            y = ref_y + offset_y
            weight = tl.exp(tl.load(logits_ptr + entry).to(tl.float32) - top) * inverse_total
            acc = _accumulate_sample(acc, level_ptr, x, y, scalars, weight, row_stride, channels, HEAD_DIM,
                                     padded, NARROW)
    _forward_store(out_ptr, query_rows, q_mask, acc, channels, HEAD_DIM)


@jit
def _msda_fused_backward_kernel(
    value_ptr, levels_ptr, reference_ptr, offsets_ptr, logits_ptr, grad_out_ptr,
    grad_value_ptr, grad_offsets_ptr, grad_logits_ptr,
    num_keys, num_queries,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
):
    # grad_offsets and grad_logits are float32 buffers: the launcher rounds them once.
    queries, query_rows, q_mask, head_offset, channels = _program_setup(num_keys, num_queries, NUM_HEADS, HEAD_DIM,
                                                                        BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    top, inverse_total = _softmax_scale(logits_ptr, entries, NUM_LEVELS * NUM_POINTS)
    grad_out = _gather(grad_out_ptr + query_rows * HEAD_DIM, channels, HEAD_DIM, padded)

    # d(loss)/d(prob) of each (level, point) goes to grad_logits as it comes; the softmax Jacobian
    # d(logit_k) = p_k * (d(p_k) - sum_j p_j * d(p_j)) then rewrites them in place (each lane
    # rereads what it wrote).
    weighted = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_offset = head_offset + first_key
        ref_x, ref_y = _pixel_pairs(reference_ptr, queries * NUM_LEVELS + level, width, height)
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            offset_x, offset_y = _load_pairs(offsets_ptr, entry)
            prob = tl.exp(tl.load(logits_ptr + entry).to(tl.float32) - top) * inverse_total
            grad_prob, grad_x, grad_y = _sample_backward(
                value_ptr + level_offset, grad_value_ptr + level_offset, ref_x + offset_x, ref_y + offset_y, scalars,
                prob, grad_out, q_mask, row_stride, channels, HEAD_DIM, padded, VALUE_GRAD)
            # The pixel coordinate is ref * size + offset - 0.5: offsets get the pixel gradient as is.
            _store_pairs(grad_offsets_ptr, entry, grad_x, grad_y, q_mask)
            tl.store(grad_logits_ptr + entry, grad_prob, mask=q_mask)
            weighted += prob * grad_prob
    for lp in tl.static_range(NUM_LEVELS * NUM_POINTS):
        prob = tl.exp(tl.load(logits_ptr + entries + lp).to(tl.float32) - top) * inverse_total
        grad_prob = tl.load(grad_logits_ptr + entries + lp, mask=q_mask, other=0.0)
        tl.store(grad_logits_ptr + entries + lp, prob * (grad_prob - weighted), mask=q_mask)


# ---------------------------------------------------------------------------------------------
# Launchers, autograd and input checks
# ---------------------------------------------------------------------------------------------


def msda_forward_config(num_queries: int, head_dim: int, element_size: int,
                        interpreting: bool = INTERPRETING) -> dict[str, int]:
    """BLOCK_Q, CHUNK, NUM_CHUNKS and num_warps of the forward launches (plain and fused) when
    autotuning is off.

    ``interpreting`` asks for the configuration of Triton's interpreter instead of a GPU's: the
    ahead-of-time compile checks pass False to see the GPU one whatever the process runs under.
    """
    # 16-byte loads where the head's channels allow: CHUNK divides head_dim, so that every chunk,
    # and every head's first channel, is 16-byte aligned when the rows are.
    chunk = min(16 // element_size, head_dim & -head_dim)
    chunks = triton.next_power_of_2(triton.cdiv(head_dim, chunk))
    if interpreting:
        # The interpreter runs programs one after another at a roughly fixed cost each, so it
        # wants few, large programs: one per (batch, head) for up to 256 queries.
        return dict(BLOCK_Q=min(triton.next_power_of_2(num_queries), 256), CHUNK=chunk, NUM_CHUNKS=chunks, num_warps=4)
    # One lane per query: a program of num_warps warps covers 32 * num_warps queries.
    block_q = min(128, max(32, triton.next_power_of_2(num_queries)))
    return dict(BLOCK_Q=block_q, CHUNK=chunk, NUM_CHUNKS=chunks, num_warps=block_q // 32)


# The forward's autotuning space: programs of 1, 2, 4 or 8 warps, one lane per query in each. The
# per-lane code is the same; they differ in how the work spreads over the SMs (and the tail of
# the grid) and in how many neighbouring queries, whose samples overlap, share an SM's L1.
FORWARD_TUNING_BLOCKS = (32, 64, 128, 256)


def msda_forward_configs(num_queries: int, head_dim: int, element_size: int,
                         interpreting: bool = INTERPRETING) -> list[dict[str, int]]:
    """Every forward launch configuration autotuning may pick, msda_forward_config's first (the
    interpreter has only its own)."""
    fixed = msda_forward_config(num_queries, head_dim, element_size, interpreting)
    if interpreting:
        return [fixed]
    return [fixed, *(dict(fixed, BLOCK_Q=block, num_warps=block // 32) for block in FORWARD_TUNING_BLOCKS
                     if block != fixed["BLOCK_Q"])]


def _forward_tuner(kernel: Any) -> Any:
    """``kernel`` autotuned over FORWARD_TUNING_BLOCKS, once per storage dtype (Triton adds the
    arguments' dtypes to the key), head size and power-of-two bucket of the query count."""
    if not TRITON_AVAILABLE:
        return None
    configs = [triton.Config({"BLOCK_Q": block}, num_warps=block // 32) for block in FORWARD_TUNING_BLOCKS]
    return triton.autotune(configs, key=["query_bucket", "HEAD_DIM"])(kernel)


_msda_forward_tuned = _forward_tuner(_msda_forward_kernel)
_msda_fused_forward_tuned = _forward_tuner(_msda_fused_forward_kernel)


def _lane_launch(value: torch.Tensor, shapes: list[tuple[int, int]], num_queries: int, num_points: int,
                 element_size: int) -> tuple[list[dict[str, int]], Callable[[dict[str, int]], tuple[int, int]],
                                             dict[str, Any]]:
    """What a launch of a one-lane-per-query kernel (every MSDA kernel) needs: the
    configurations (msda_forward_configs for chunks of ``element_size`` bytes, as BLOCK_Q and
    num_warps), the grid of one and the meta-parameters every configuration shares."""
    batch, _, heads, head_dim = value.shape
    configs = msda_forward_configs(num_queries, head_dim, element_size)
    meta = dict(NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_LEVELS=len(shapes), NUM_POINTS=num_points,
                CHUNK=configs[0]["CHUNK"], NUM_CHUNKS=configs[0]["NUM_CHUNKS"],
                # A level one pixel high or wide (tiny inputs) has no second neighbour along that axis.
                NARROW=min(min(shape) for shape in shapes) < 2)
    return ([{"BLOCK_Q": c["BLOCK_Q"], "num_warps": c["num_warps"]} for c in configs],
            lambda config: (triton.cdiv(num_queries, config["BLOCK_Q"]), batch * heads), meta)


def _launch_backward(kernel: Any, value: torch.Tensor, shapes: list[tuple[int, int]], num_queries: int,
                     num_points: int, *args: Any, value_grad: bool) -> None:
    """Launch a backward kernel, plain or fused (``args``: its tensors, the level table first), at
    the fixed configuration (autotuning would run the value gradient's atomics once per candidate)
    in chunks of 4 channels: the float32 gradient's 16-byte vector atomics."""
    configs, grid, meta = _lane_launch(value, shapes, num_queries, num_points, element_size=4)
    launch(kernel, grid(configs[0]), value, *args, value.shape[1], num_queries, VALUE_GRAD=value_grad, **meta,
           **configs[0])


def _launch_forward(tuner: Any, value: torch.Tensor, shapes: list[tuple[int, int]], num_queries: int,
                    num_points: int, *args: Any) -> None:
    """Launch a forward kernel, plain or fused (``args``: its tensors after the level table),
    autotuned unless autotuning is off (see msda_forward_configs)."""
    configs, grid, meta = _lane_launch(value, shapes, num_queries, num_points, value.element_size())
    launch_tuned(tuner, configs, grid, value, _levels(shapes, value.device), *args, value.shape[1], num_queries,
                 triton.next_power_of_2(num_queries), **meta)


@functools.lru_cache(maxsize=64)
def _level_table(shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """[L, 3] int32 (height, width, first key) on ``device``, built once per (shapes, device)."""
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    rows = [(height, width, start) for (height, width), start in zip(shapes, starts)]
    # Outside inference mode even when first asked for inside it: an inference tensor in the cache
    # could not be saved for a later backward.
    with torch.inference_mode(False):
        return torch.tensor(rows, dtype=torch.int32, device=device)


def _levels(shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """The level table; uncached while torch.compile or torch.export traces, where the tensor
    built is a fake or a graph constant that must not outlive the trace."""
    if torch.compiler.is_compiling():
        return _level_table.__wrapped__(tuple(shapes), device)
    return _level_table(tuple(shapes), device)


def _pairs(spatial_shapes: list[int]) -> list[tuple[int, int]]:
    """(height, width) pairs from the operators' flat [H_0, W_0, H_1, W_1, ...] (a schema has no
    list of pairs)."""
    return list(zip(spatial_shapes[::2], spatial_shapes[1::2]))


def _flat(shapes: list[tuple[int, int]]) -> list[int]:
    return [size for shape in shapes for size in shape]


def _value_gradient(value: torch.Tensor, needed: bool) -> torch.Tensor:
    """The fp32 buffer the backward scatters the value gradient into (a scatter: accumulate in
    fp32, round once at the end); when unneeded, value itself stands in and is never written."""
    if not needed:
        return value
    check_deterministic("ms_deform_attn", value.device)
    return torch.zeros(value.shape, dtype=torch.float32, device=value.device)


# The custom operators. Their bodies launch the kernels (a forward traced on CPU runs the reference
# instead); their fake implementations only describe the outputs. The backward is functional
# (register_autograd): it calls the backward operator, so that torch.compile and torch.export see
# every step, or, where the forward was traced as the reference, differentiates the reference.

def _msda_forward(value: torch.Tensor, spatial_shapes: list[int], locations: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    shapes = _pairs(spatial_shapes)
    if traced_on_cpu(value):
        return ms_deform_attn_reference(value, shapes, None, locations, weights)
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = locations.shape
    out = value.new_empty(batch, num_queries, heads, head_dim)
    _launch_forward(_msda_forward_tuned, value, shapes, num_queries, num_points, locations, weights, out)
    return out.view(batch, num_queries, heads * head_dim)


def _msda_backward(value: torch.Tensor, spatial_shapes: list[int], locations: torch.Tensor, weights: torch.Tensor,
                   grad_out: torch.Tensor, value_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = _pairs(spatial_shapes)
    _, num_queries, _, _, num_points, _ = locations.shape
    grad_value = _value_gradient(value, value_grad)
    grad_locations = torch.empty_like(locations)
    grad_weights = torch.empty_like(weights)
    _launch_backward(_msda_backward_kernel, value, shapes, num_queries, num_points, _levels(shapes, value.device),
                     locations, weights, grad_out, grad_value, grad_locations, grad_weights, value_grad=value_grad)
    return grad_value.to(value.dtype) if value_grad else skipped_gradient(value), grad_locations, grad_weights


def _msda_fused_forward(value: torch.Tensor, spatial_shapes: list[int], reference_points: torch.Tensor,
                        sampling_offsets: torch.Tensor, attention_logits: torch.Tensor) -> torch.Tensor:
    shapes = _pairs(spatial_shapes)
    if traced_on_cpu(value):
        return ms_deform_attn_fused_reference(value, shapes, None, reference_points, sampling_offsets,
                                              attention_logits)
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = sampling_offsets.shape
    out = value.new_empty(batch, num_queries, heads, head_dim)
    _launch_forward(_msda_fused_forward_tuned, value, shapes, num_queries, num_points, reference_points,
                    sampling_offsets, attention_logits, out)
    return out.view(batch, num_queries, heads * head_dim)


def _msda_fused_backward(
    value: torch.Tensor, spatial_shapes: list[int], reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor, grad_out: torch.Tensor, value_grad: bool, reference_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of value, reference_points, sampling_offsets and attention_logits."""
    shapes = _pairs(spatial_shapes)
    _, num_queries, _, _, num_points, _ = sampling_offsets.shape
    levels = _levels(shapes, value.device)
    grad_value = _value_gradient(value, value_grad)
    # fp32, because the reference points' gradient is summed from it below.
    grad_offsets = torch.empty(sampling_offsets.shape, dtype=torch.float32, device=value.device)
    grad_logits = torch.empty(attention_logits.shape, dtype=torch.float32, device=value.device)
    _launch_backward(_msda_fused_backward_kernel, value, shapes, num_queries, num_points, levels, reference_points,
                     sampling_offsets, attention_logits, grad_out, grad_value, grad_offsets, grad_logits,
                     value_grad=value_grad)
    grad_reference = skipped_gradient(reference_points)
    if reference_grad:
        # loc = ref + offset / (W, H): d(ref) = sum over heads and points of d(offset) * (W, H).
        sizes = levels[:, :2].flip(-1).to(torch.float32)  # [L, (W, H)], without an index tensor
        grad_reference = (grad_offsets * sizes[:, None, :]).sum(dim=(2, 4)).to(reference_points.dtype)
    return (grad_value.to(value.dtype) if value_grad else skipped_gradient(value), grad_reference,
            grad_offsets.to(sampling_offsets.dtype), grad_logits.to(attention_logits.dtype))


msda_forward_op = triton_op("msda_forward", _msda_forward)
msda_backward_op = triton_op("msda_backward", _msda_backward)
msda_fused_forward_op = triton_op("msda_fused_forward", _msda_fused_forward)
msda_fused_backward_op = triton_op("msda_fused_backward", _msda_fused_backward)


def _output_like(value: torch.Tensor, queries: int) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, queries, heads * head_dim)


@msda_forward_op.register_fake
def _msda_forward_fake(value: torch.Tensor, spatial_shapes: list[int], locations: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    return _output_like(value, locations.shape[1])


@msda_backward_op.register_fake
def _msda_backward_fake(value: torch.Tensor, spatial_shapes: list[int], locations: torch.Tensor,
                        weights: torch.Tensor, grad_out: torch.Tensor,
                        value_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gradient_like(value, value_grad), gradient_like(locations), gradient_like(weights)


@msda_fused_forward_op.register_fake
def _msda_fused_forward_fake(value: torch.Tensor, spatial_shapes: list[int], reference_points: torch.Tensor,
                             sampling_offsets: torch.Tensor, attention_logits: torch.Tensor) -> torch.Tensor:
    return _output_like(value, sampling_offsets.shape[1])


@msda_fused_backward_op.register_fake
def _msda_fused_backward_fake(
    value: torch.Tensor, spatial_shapes: list[int], reference_points: torch.Tensor, sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor, grad_out: torch.Tensor, value_grad: bool, reference_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (gradient_like(value, value_grad), gradient_like(reference_points, reference_grad),
            gradient_like(sampling_offsets), gradient_like(attention_logits))


def _save_inputs(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    """setup_context of both forward operators: every input but the level sizes (second) is saved."""
    value, spatial_shapes, *tensors = inputs
    ctx.spatial_shapes = spatial_shapes
    ctx.save_for_backward(value, *tensors)


def _gradients(ctx: Any, grad_out: torch.Tensor, *, reference: Callable[..., torch.Tensor],
               backward_op: torch.library.CustomOpDef, flagged: tuple[int, ...]) -> tuple[torch.Tensor | None, ...]:
    """Backward of both forward operators: ``backward_op``, told by a flag per input in ``flagged``
    whether that gradient is needed, or, traced on CPU, the gradient of ``reference``."""
    value, *tensors = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if traced_on_cpu(value):  # the forward traced as the reference: differentiate that
        shapes = _pairs(ctx.spatial_shapes)
        grads = reference_vjp(lambda v, *rest: reference(v, shapes, None, *rest), (value, *tensors), grad_out)
    else:
        grads = backward_op(value, ctx.spatial_shapes, *tensors, grad_out.contiguous(),
                            *(needs[index] for index in flagged))
    # The level sizes (input 1) get no gradient.
    return grads[0] if needs[0] else None, None, *(grad if need else None for grad, need in zip(grads[1:], needs[2:]))


msda_forward_op.register_autograd(
    functools.partial(_gradients, reference=ms_deform_attn_reference, backward_op=msda_backward_op, flagged=(0,)),
    setup_context=_save_inputs)
msda_fused_forward_op.register_autograd(
    functools.partial(_gradients, reference=ms_deform_attn_fused_reference, backward_op=msda_fused_backward_op,
                      flagged=(0, 2)),
    setup_context=_save_inputs)


def _check_levels(op: str, value: torch.Tensor, spatial_shapes: SpatialShapes,
                  level_start_index: torch.Tensor | None) -> list[tuple[int, int]]:
    """Check value [B, S, H, D] against the level sizes; return them as Python ints."""
    check_float(op, "value", value)
    check_shape(op, "value", value, ("B", "S", "H", "D"))
    if isinstance(spatial_shapes, torch.Tensor) and (
            spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point()):
        raise ValueError(f"{op}: spatial_shapes must be an integer tensor of shape [L, 2] (height, width), "
                         f"got {spatial_shapes.dtype} of shape {list(spatial_shapes.shape)}")
    try:
        shapes = as_shape_list(spatial_shapes)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{op}: spatial_shapes must be an [L, 2] tensor or a sequence of (height, width) "
                         f"pairs, got {spatial_shapes!r}") from error
    if not shapes or any(height <= 0 or width <= 0 for height, width in shapes):
        raise ValueError(f"{op}: spatial_shapes needs at least one level, all sizes positive; got {shapes}")
    keys = sum(height * width for height, width in shapes)
    # The forward kernels address a level's elements with int32: (keys of the level) * H * D.
    if max(height * width for height, width in shapes) * value.shape[2] * value.shape[3] >= 2**31:
        raise ValueError(f"{op}: a level of {shapes} holds 2^31 or more value elements of one image, more than "
                         "the kernels address")
    if value.shape[1] != keys:
        raise ValueError(f"{op}: value has {value.shape[1]} keys (dim 1) but spatial_shapes {shapes} "
                         f"hold {keys}")
    if level_start_index is not None and torch.as_tensor(level_start_index).shape != (len(shapes),):
        raise ValueError(f"{op}: level_start_index must have shape [L] = [{len(shapes)}], "
                         f"got {list(torch.as_tensor(level_start_index).shape)}")
    return shapes


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Triton MSDA with autograd; same contract and result as :func:`ms_deform_attn_reference`.

    value [B, S, H, D]; spatial_shapes [L, 2] (height, width) tensor or pairs;
    level_start_index [L] or None (only its shape is checked: the starts follow from the shapes);
    sampling_locations [B, Q, H, L, P, 2] normalised (x, y); attention_weights [B, Q, H, L, P].
    Floats may be float32, float16 or bfloat16 (each tensor its own); sampling and sums run in
    float32. Returns [B, Q, H * D] in value's dtype. Gradients flow to value, sampling_locations
    and attention_weights.
    """
    op = "ms_deform_attn"
    shapes = _check_levels(op, value, spatial_shapes, level_start_index)
    batch, _, heads, _ = value.shape
    check_float(op, "sampling_locations", sampling_locations)
    check_shape(op, "sampling_locations", sampling_locations, (batch, "Q", heads, len(shapes), "P", 2))
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    check_float(op, "attention_weights", attention_weights)
    check_shape(op, "attention_weights", attention_weights, (batch, queries, heads, len(shapes), points))
    device = check_same_device(op, value=value, sampling_locations=sampling_locations,
                               attention_weights=attention_weights)
    require_triton(op, device)
    return msda_forward_op(value.contiguous(), _flat(shapes), sampling_locations.contiguous(),
                           attention_weights.contiguous())


def ms_deform_attn_fused_triton(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """Triton MSDA taking a layer's raw projections; same result as :func:`ms_deform_attn_fused_reference`.

    reference_points [B, Q, L, 2] normalised (x, y); sampling_offsets [B, Q, H, L, P, 2] in pixels
    of each level; attention_logits [B, Q, H, L * P] before the softmax. The softmax over (L, P)
    and loc = ref + offset / (W_l, H_l) happen inside the kernel, in float32. Other arguments,
    dtypes and the result are as in :func:`ms_deform_attn_triton`. Gradients flow to value,
    reference_points, sampling_offsets and attention_logits.
    """
    op = "ms_deform_attn_fused"
    shapes = _check_levels(op, value, spatial_shapes, level_start_index)
    batch, _, heads, _ = value.shape
    levels = len(shapes)
    check_float(op, "sampling_offsets", sampling_offsets)
    check_shape(op, "sampling_offsets", sampling_offsets, (batch, "Q", heads, levels, "P", 2))
    queries, points = sampling_offsets.shape[1], sampling_offsets.shape[4]
    check_float(op, "reference_points", reference_points)
    check_shape(op, "reference_points", reference_points, (batch, queries, levels, 2))
    check_float(op, "attention_logits", attention_logits)
    check_shape(op, "attention_logits", attention_logits, (batch, queries, heads, levels * points))
    device = check_same_device(op, value=value, reference_points=reference_points,
                               sampling_offsets=sampling_offsets, attention_logits=attention_logits)
    require_triton(op, device)
    return msda_fused_forward_op(value.contiguous(), _flat(shapes), reference_points.contiguous(),
                                 sampling_offsets.contiguous(), attention_logits.contiguous())
