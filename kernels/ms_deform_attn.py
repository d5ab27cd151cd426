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
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

SpatialShapes = torch.Tensor | Sequence[tuple[int, int]]


def as_shape_list(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """Level sizes as Python ints (static under tracing and export)."""
    if isinstance(spatial_shapes, torch.Tensor):
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Plain-PyTorch MSDA (grid_sample per level). ``level_start_index`` is implied by the shapes."""
    shapes = as_shape_list(spatial_shapes)
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # [B, h*w, H, D] -> [B*H, D, h, w]
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, h, w)
        # [B, Q, H, P, 2] -> [B*H, Q, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*H, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


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
    -> sampling_locations [B, Q, H, L, P, 2], attention_weights [B, Q, H, L, P]
    """
    shapes = as_shape_list(spatial_shapes)
    batch, queries, heads, levels, points, _ = sampling_offsets.shape
    # Offsets are in pixels: x is normalised by the level's width, y by its height.
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=sampling_offsets.dtype, device=sampling_offsets.device)
    locations = reference_points[:, :, None, :, None, :] + sampling_offsets / normalizer[None, None, None, :, None, :]
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
