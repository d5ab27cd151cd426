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
    shapes = as_shape_list(spatial_shapes)
    batch, _, heads, head_dim = value.shape
    queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    # Every (image, head) pair is one channel-first image for grid_sample: [B*H, D, S].
    images = value.to(dtype).permute(0, 2, 3, 1).reshape(batch * heads, head_dim, -1)
    # grid_sample addresses [-1, 1]; with align_corners=False that maps onto [0, 1] linearly.
    grids = (2 * sampling_locations.to(dtype) - 1).transpose(1, 2).reshape(batch * heads, queries, levels, points, 2)
    level_images = images.split([height * width for height, width in shapes], dim=-1)
    # [B*H, D, Q, L*P]: the bilinear sample of every (level, point), levels side by side.
    samples = torch.cat([
        F.grid_sample(image.unflatten(-1, size), grids[:, :, level], mode="bilinear", padding_mode="zeros",
                      align_corners=False)
        for level, (image, size) in enumerate(zip(level_images, shapes))
    ], dim=-1)
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
# Backward: a (BLOCK_Q, BLOCK_D) tile per program, several lanes per query; the value gradient is
# scattered with atomics.
# ---------------------------------------------------------------------------------------------


@jit
def _split_coordinate(pixel, size):
    """Integer part (of the lower neighbour) and fraction of an fp32 pixel coordinate."""
    # Beyond one pixel outside the level both neighbours are padding; clamping there changes no
    # result and keeps the int32 conversion in range for far-away locations.
    pixel = tl.minimum(tl.maximum(pixel, -2.0), size.to(tl.float32) + 1.0)
    lower = tl.floor(pixel)
    return lower.to(tl.int32), pixel - lower


@jit
def _axis_neighbours(pixel, last_first, reach):
    """Along one axis, the lower of the two neighbours a forward sample reads, and both
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
    return (lower.to(tl.int32), tl.maximum(1.0 - tl.abs(distance), 0.0),
            tl.maximum(tl.minimum(distance, reach - distance), 0.0))


@jit
def _gather(pointers, channels, HEAD_DIM: tl.constexpr, PADDED: tl.constexpr):
    """(NUM_CHUNKS, BLOCK_Q, CHUNK) fp32 channels at ``pointers`` (one key per query)."""
    pointers = pointers[None, :, None] + channels
    if PADDED:  # HEAD_DIM is not NUM_CHUNKS * CHUNK: the last chunks are partly past the head
        return tl.load(pointers, mask=channels < HEAD_DIM, other=0.0).to(tl.float32)
    return tl.load(pointers).to(tl.float32)


@jit
def _level_scalars(levels_ptr, level, row_stride, NARROW: tl.constexpr):
    """What the forward's samples of one level share: the offset of its first key (in elements,
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
    x0, wx0, wx1 = _axis_neighbours(x, last_x, reach_x)
    y0, wy0, wy1 = _axis_neighbours(y, last_y, reach_y)
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
def _forward_setup(value_ptr, num_keys, num_queries, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    """What both forward kernels start from: the (batch, head) of the program, its queries' rows in
    [B, Q, H] (past-the-end queries clamped to the last one, so that their loads stay in bounds;
    only the store is masked), the head's first value element and the channel offsets."""
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    queries = batch.to(tl.int64) * num_queries + tl.minimum(q, num_queries - 1)
    head_ptr = value_ptr + batch.to(tl.int64) * num_keys * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
    channels = tl.arange(0, NUM_CHUNKS)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]
    return queries, queries * NUM_HEADS + head, q_mask, head_ptr, channels


@jit
def _load_pairs(pairs_ptr, index):
    """fp32 (x, y) of the pairs ``index`` of a [..., 2] tensor, read as one load per query."""
    pair = tl.load(pairs_ptr + 2 * index[:, None] + tl.arange(0, 2)[None, :]).to(tl.float32)
    return tl.split(pair)


@jit
def _forward_store(out_ptr, query_rows, q_mask, acc, channels, HEAD_DIM: tl.constexpr):
    tl.store(out_ptr + (query_rows * HEAD_DIM)[None, :, None] + channels, acc.to(out_ptr.dtype.element_ty),
             mask=q_mask[None, :, None] & (channels < HEAD_DIM))


@jit
def _corner(xi, yi, width, height, row_stride, q_mask, d, d_mask):
    """Offsets (from the level's first key of this head) and load mask of one neighbour.

    A neighbour outside the level is masked out, which is grid_sample's zero padding.
    """
    inside = q_mask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    rows = (yi * width + xi).to(tl.int64) * row_stride
    return rows[:, None] + d[None, :], inside[:, None] & d_mask[None, :]


@jit
def _bilinear_backward(level_ptr, level_grad_ptr, x, y, width, height, row_stride, weight, grad_out,
                       q_mask, d, d_mask, VALUE_GRAD: tl.constexpr):
    """Backward of ``weight * bilinear_sample(x, y)`` for one point of a block of queries.

    With VALUE_GRAD, scatters d(loss)/d(value) into the level's fp32 gradient with atomics (other
    queries and heads hit the same rows). Returns d(loss)/d(weight) and d(loss)/d(x, y) in pixels.
    """
    x0, fx = _split_coordinate(x, width)
    y0, fy = _split_coordinate(y, height)
    wx1 = fx[:, None]
    wy1 = fy[:, None]
    wx0 = 1.0 - wx1
    wy0 = 1.0 - wy1
    grad_sample = grad_out * weight[:, None]
    offsets00, mask00 = _corner(x0, y0, width, height, row_stride, q_mask, d, d_mask)
    offsets01, mask01 = _corner(x0 + 1, y0, width, height, row_stride, q_mask, d, d_mask)
    offsets10, mask10 = _corner(x0, y0 + 1, width, height, row_stride, q_mask, d, d_mask)
    offsets11, mask11 = _corner(x0 + 1, y0 + 1, width, height, row_stride, q_mask, d, d_mask)
    v00 = tl.load(level_ptr + offsets00, mask=mask00, other=0.0).to(tl.float32)
    v01 = tl.load(level_ptr + offsets01, mask=mask01, other=0.0).to(tl.float32)
    v10 = tl.load(level_ptr + offsets10, mask=mask10, other=0.0).to(tl.float32)
    v11 = tl.load(level_ptr + offsets11, mask=mask11, other=0.0).to(tl.float32)
    if VALUE_GRAD:
        tl.atomic_add(level_grad_ptr + offsets00, grad_sample * (wx0 * wy0), mask=mask00, sem="relaxed")
        tl.atomic_add(level_grad_ptr + offsets01, grad_sample * (wx1 * wy0), mask=mask01, sem="relaxed")
        tl.atomic_add(level_grad_ptr + offsets10, grad_sample * (wx0 * wy1), mask=mask10, sem="relaxed")
        tl.atomic_add(level_grad_ptr + offsets11, grad_sample * (wx1 * wy1), mask=mask11, sem="relaxed")
    sample = (v00 * wx0 + v01 * wx1) * wy0 + (v10 * wx0 + v11 * wx1) * wy1
    sample_dx = (v01 - v00) * wy0 + (v11 - v10) * wy1
    sample_dy = (v10 - v00) * wx0 + (v11 - v01) * wx1
    grad_weight = tl.sum(grad_out * sample, axis=1)
    grad_x = tl.sum(grad_sample * sample_dx, axis=1)
    grad_y = tl.sum(grad_sample * sample_dy, axis=1)
    return grad_weight, grad_x, grad_y


@jit
def _softmax_rows(logits_ptr, rows, q_mask, NUM_LP: tl.constexpr, BLOCK_LP: tl.constexpr):
    """fp32 softmax of the (BLOCK_Q, L*P) logits starting at ``rows``, and the column indices."""
    lp = tl.arange(0, BLOCK_LP)
    lp_mask = lp < NUM_LP
    logits = tl.load(logits_ptr + rows[:, None] + lp[None, :], mask=q_mask[:, None] & lp_mask[None, :],
                     other=0.0).to(tl.float32)
    logits = tl.where(lp_mask[None, :], logits, float("-inf"))
    exp = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return exp / tl.sum(exp, axis=1)[:, None], lp


@jit
def _column(tile, columns, index):
    """tile[:, index] of a register tile (an exact select-and-sum: Triton cannot index registers)."""
    return tl.sum(tl.where(columns[None, :] == index, tile, 0.0), axis=1)


@jit
def _msda_forward_kernel(
    value_ptr, levels_ptr, locations_ptr, weights_ptr, out_ptr,
    num_keys, num_queries, query_bucket,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
):
    _, query_rows, q_mask, head_ptr, channels = _forward_setup(value_ptr, num_keys, num_queries, NUM_HEADS,
                                                               HEAD_DIM, BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    # First (level, point) entry of each query's row in the [B, Q, H, L, P] weights.
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    acc = tl.zeros((NUM_CHUNKS, BLOCK_Q, CHUNK), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_ptr = head_ptr + first_key
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            loc_x, loc_y = _load_pairs(locations_ptr, entry)
            weight = tl.load(weights_ptr + entry).to(tl.float32)
            # align_corners=False: pixel centres sit at normalised (i + 0.5) / size.
            x = loc_x * width.to(tl.float32) - 0.5
            y = loc_y * height.to(tl.float32) - 0.5
            acc = _accumulate_sample(acc, level_ptr, x, y, scalars, weight, row_stride, channels, HEAD_DIM,
                                     padded, NARROW)
    _forward_store(out_ptr, query_rows, q_mask, acc, channels, HEAD_DIM)


@jit
def _msda_backward_kernel(
    value_ptr, levels_ptr, locations_ptr, weights_ptr, grad_out_ptr,
    grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_keys, num_queries,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, VALUE_GRAD: tl.constexpr,
):
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    head_offset = batch.to(tl.int64) * num_keys * row_stride + head * HEAD_DIM
    query_rows = (batch * num_queries + q).to(tl.int64) * NUM_HEADS + head
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    grad_out = tl.load(grad_out_ptr + query_rows[:, None] * HEAD_DIM + d[None, :],
                       mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        level_offset = head_offset + tl.load(levels_ptr + 3 * level + 2).to(tl.int64) * row_stride
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            loc_x = tl.load(locations_ptr + 2 * entry, mask=q_mask, other=0.0).to(tl.float32)
            loc_y = tl.load(locations_ptr + 2 * entry + 1, mask=q_mask, other=0.0).to(tl.float32)
            weight = tl.load(weights_ptr + entry, mask=q_mask, other=0.0).to(tl.float32)
            x = loc_x * width.to(tl.float32) - 0.5
            y = loc_y * height.to(tl.float32) - 0.5
            grad_weight, grad_x, grad_y = _bilinear_backward(
                value_ptr + level_offset, grad_value_ptr + level_offset, x, y, width, height, row_stride,
                weight, grad_out, q_mask, d, d_mask, VALUE_GRAD)
            # x = loc_x * width - 0.5, so d(loss)/d(loc_x) = width * d(loss)/d(x).
            grad_dtype = grad_locations_ptr.dtype.element_ty
            tl.store(grad_locations_ptr + 2 * entry, (grad_x * width.to(tl.float32)).to(grad_dtype), mask=q_mask)
            tl.store(grad_locations_ptr + 2 * entry + 1, (grad_y * height.to(tl.float32)).to(grad_dtype), mask=q_mask)
            tl.store(grad_weights_ptr + entry, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=q_mask)


@jit
def _msda_fused_forward_kernel(
    value_ptr, levels_ptr, reference_ptr, offsets_ptr, logits_ptr, out_ptr,
    num_keys, num_queries, query_bucket,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, NARROW: tl.constexpr,
):
    queries, query_rows, q_mask, head_ptr, channels = _forward_setup(value_ptr, num_keys, num_queries, NUM_HEADS,
                                                                     HEAD_DIM, BLOCK_Q, CHUNK, NUM_CHUNKS)
    row_stride = NUM_HEADS * HEAD_DIM
    padded = NUM_CHUNKS * CHUNK != HEAD_DIM
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    # Softmax over (L, P) in two passes over the logits, each lane over its own query's: the max,
    # then the sum of exponentials; the sampling loop below recomputes each exponential (the
    # logits come from L1 the second time). Cheaper than keeping an (L * P)-wide tile.
    top = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    for lp in tl.static_range(NUM_LEVELS * NUM_POINTS):
        top = tl.maximum(top, tl.load(logits_ptr + entries + lp).to(tl.float32))
    total = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for lp in tl.static_range(NUM_LEVELS * NUM_POINTS):
        total += tl.exp(tl.load(logits_ptr + entries + lp).to(tl.float32) - top)
    inverse_total = 1.0 / total

    acc = tl.zeros((NUM_CHUNKS, BLOCK_Q, CHUNK), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        first_key, height, width, scalars = _level_scalars(levels_ptr, level, row_stride, NARROW)
        level_ptr = head_ptr + first_key
        # reference_points is [B, Q, L, 2]: shared by the heads. loc = ref + offset / size, so the
        # pixel coordinate loc * size - 0.5 is ref * size + offset - 0.5 (no division).
        ref_x, ref_y = _load_pairs(reference_ptr, queries * NUM_LEVELS + level)
        ref_x = ref_x * width.to(tl.float32) - 0.5
        ref_y = ref_y * height.to(tl.float32) - 0.5
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
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_LP: tl.constexpr, VALUE_GRAD: tl.constexpr,
):
    batch = tl.program_id(1) // NUM_HEADS
    head = tl.program_id(1) % NUM_HEADS
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    head_offset = batch.to(tl.int64) * num_keys * row_stride + head * HEAD_DIM
    query_rows = (batch * num_queries + q).to(tl.int64) * NUM_HEADS + head
    entries = query_rows * (NUM_LEVELS * NUM_POINTS)
    reference_rows = (batch * num_queries + q).to(tl.int64) * NUM_LEVELS
    probs, lp = _softmax_rows(logits_ptr, entries, q_mask, NUM_LEVELS * NUM_POINTS, BLOCK_LP)
    grad_out = tl.load(grad_out_ptr + query_rows[:, None] * HEAD_DIM + d[None, :],
                       mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)

    grad_probs = tl.zeros((BLOCK_Q, BLOCK_LP), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(levels_ptr + 3 * level)
        width = tl.load(levels_ptr + 3 * level + 1)
        level_offset = head_offset + tl.load(levels_ptr + 3 * level + 2).to(tl.int64) * row_stride
        ref_x = tl.load(reference_ptr + 2 * (reference_rows + level), mask=q_mask, other=0.0).to(tl.float32)
        ref_y = tl.load(reference_ptr + 2 * (reference_rows + level) + 1, mask=q_mask, other=0.0).to(tl.float32)
        for point in tl.static_range(NUM_POINTS):
            entry = entries + level * NUM_POINTS + point
            offset_x = tl.load(offsets_ptr + 2 * entry, mask=q_mask, other=0.0).to(tl.float32)
            offset_y = tl.load(offsets_ptr + 2 * entry + 1, mask=q_mask, other=0.0).to(tl.float32)
            weight = _column(probs, lp, level * NUM_POINTS + point)
            x = ref_x * width.to(tl.float32) + offset_x - 0.5
            y = ref_y * height.to(tl.float32) + offset_y - 0.5
            grad_weight, grad_x, grad_y = _bilinear_backward(
                value_ptr + level_offset, grad_value_ptr + level_offset, x, y, width, height, row_stride,
                weight, grad_out, q_mask, d, d_mask, VALUE_GRAD)
            grad_probs = tl.where(lp[None, :] == level * NUM_POINTS + point, grad_weight[:, None], grad_probs)
            # The pixel coordinate is ref * size + offset - 0.5: offsets get the pixel gradient as is.
            tl.store(grad_offsets_ptr + 2 * entry, grad_x, mask=q_mask)
            tl.store(grad_offsets_ptr + 2 * entry + 1, grad_y, mask=q_mask)

    # Softmax Jacobian: d(logit_k) = p_k * (d(p_k) - sum_j p_j * d(p_j)).
    grad_logits = probs * (grad_probs - tl.sum(probs * grad_probs, axis=1)[:, None])
    tl.store(grad_logits_ptr + entries[:, None] + lp[None, :], grad_logits.to(grad_logits_ptr.dtype.element_ty),
             mask=q_mask[:, None] & (lp < NUM_LEVELS * NUM_POINTS)[None, :])


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


def msda_backward_config(num_queries: int, head_dim: int, interpreting: bool = INTERPRETING) -> dict[str, int]:
    """BLOCK_Q, BLOCK_D and num_warps of the backward launches (plain and fused); see msda_forward_config."""
    block_d = triton.next_power_of_2(head_dim)
    if interpreting:
        return dict(BLOCK_Q=min(triton.next_power_of_2(num_queries), 256), BLOCK_D=block_d, num_warps=4)
    # The compiler hoists the unrolled gathers, so registers grow with the tile: ptxas (sm_90,
    # fp32, 4 warps) gives 141 registers for 512-element tiles and 242 for 1024, and spills at
    # 2048. Not yet tuned on hardware.
    block_q = max(1, min(512 // block_d, triton.next_power_of_2(num_queries)))
    return dict(BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)


def _backward_launch(value: torch.Tensor, shapes: list[tuple[int, int]], num_queries: int, num_points: int
                     ) -> tuple[tuple[int, int], dict]:
    """Grid and meta-parameters of a backward launch."""
    batch, _, heads, head_dim = value.shape
    config = msda_backward_config(num_queries, head_dim)
    grid = (triton.cdiv(num_queries, config["BLOCK_Q"]), batch * heads)
    return grid, dict(NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_LEVELS=len(shapes), NUM_POINTS=num_points, **config)


def _launch_forward(tuner: Any, value: torch.Tensor, shapes: list[tuple[int, int]], num_queries: int,
                    num_points: int, *args: Any) -> None:
    """Launch a forward kernel, plain or fused (``args``: its tensors after the level table),
    autotuned unless autotuning is off (see msda_forward_configs)."""
    batch, num_keys, heads, head_dim = value.shape
    configs = msda_forward_configs(num_queries, head_dim, value.element_size())
    fixed = {name: configs[0][name] for name in ("CHUNK", "NUM_CHUNKS")}  # the same in every configuration
    launch_tuned(tuner, [{"BLOCK_Q": c["BLOCK_Q"], "num_warps": c["num_warps"]} for c in configs],
                 lambda config: (triton.cdiv(num_queries, config["BLOCK_Q"]), batch * heads),
                 value, _levels(shapes, value.device), *args, num_keys, num_queries,
                 triton.next_power_of_2(num_queries), NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_LEVELS=len(shapes),
                 NUM_POINTS=num_points, **fixed,
                 # A level one pixel high or wide (tiny inputs) has no second neighbour along that axis.
                 NARROW=min(min(shape) for shape in shapes) < 2)


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
    _, num_keys, _, _ = value.shape
    _, num_queries, _, _, num_points, _ = locations.shape
    grad_value = _value_gradient(value, value_grad)
    grad_locations = torch.empty_like(locations)
    grad_weights = torch.empty_like(weights)
    grid, meta = _backward_launch(value, shapes, num_queries, num_points)
    launch(_msda_backward_kernel, grid, value, _levels(shapes, value.device), locations, weights, grad_out,
           grad_value, grad_locations, grad_weights, num_keys, num_queries, VALUE_GRAD=value_grad, **meta)
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
    _, num_keys, _, _ = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_offsets.shape
    levels = _levels(shapes, value.device)
    grad_value = _value_gradient(value, value_grad)
    # fp32, because the reference points' gradient is summed from it below.
    grad_offsets = torch.empty(sampling_offsets.shape, dtype=torch.float32, device=value.device)
    grad_logits = torch.empty_like(attention_logits)
    grid, meta = _backward_launch(value, shapes, num_queries, num_points)
    launch(_msda_fused_backward_kernel, grid, value, levels, reference_points, sampling_offsets, attention_logits,
           grad_out, grad_value, grad_offsets, grad_logits, num_keys, num_queries,
           BLOCK_LP=triton.next_power_of_2(num_levels * num_points), VALUE_GRAD=value_grad, **meta)
    grad_reference = skipped_gradient(reference_points)
    if reference_grad:
        # loc = ref + offset / (W, H): d(ref) = sum over heads and points of d(offset) * (W, H).
        sizes = levels[:, :2].flip(-1).to(torch.float32)  # [L, (W, H)], without an index tensor
        grad_reference = (grad_offsets * sizes[:, None, :]).sum(dim=(2, 4)).to(reference_points.dtype)
    return (grad_value.to(value.dtype) if value_grad else skipped_gradient(value), grad_reference,
            grad_offsets.to(sampling_offsets.dtype), grad_logits)


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
