"""Kernels behind DeRIS's two custom operations, each beside its plain-PyTorch reference.

* :func:`ms_deform_attn` — multi-scale deformable attention (pixel decoder).
* :func:`ms_deform_attn_fused` — the same, taking a layer's raw offsets and attention logits.
* :func:`mask_pool` — the loopback's mask pooling.

Each public function runs either the PyTorch reference ("torch") or the Triton kernels
("triton"). The backend is, in order of precedence:

1. the process-wide override of :func:`set_backend` (or the :func:`backend` context manager);
2. the environment variable ``DERIS_KERNELS=torch|triton``, read at every call;
3. Triton for CUDA tensors when Triton is installed, the reference otherwise (CPU tensors).

Triton on CPU tensors runs through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in
the environment before deris is imported (Triton reads it when the kernels are defined).
Importing this package never needs Triton; asking for the Triton backend without it is an error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from . import _triton_support
from .mask_pool import mask_pool_reference, mask_pool_triton
from .ms_deform_attn import (
    SpatialShapes,
    ms_deform_attn_fused_reference,
    ms_deform_attn_fused_triton,
    ms_deform_attn_reference,
    ms_deform_attn_triton,
)

BACKENDS = ("torch", "triton")
ENV_VAR = "DERIS_KERNELS"

_override: str | None = None


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; accepted: 'torch', 'triton'")
    return name


def set_backend(name: str | None) -> None:
    """Force every kernel call in this process onto ``"torch"`` or ``"triton"``; ``None`` clears it.

    The override beats the ``DERIS_KERNELS`` environment variable.
    """
    global _override
    _override = None if name is None else _check_backend_name(name, "set_backend")


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """``with backend("torch"): ...`` — :func:`set_backend` for a block; the previous override comes back after."""
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def select_backend(device: torch.device) -> str:
    """The backend a call with tensors on ``device`` uses now (see the module docstring)."""
    if _override is not None:
        return _override
    requested = os.environ.get(ENV_VAR, "")
    if requested:  # empty counts as unset
        return _check_backend_name(requested, f"environment variable {ENV_VAR}")
    return "triton" if device.type == "cuda" and _triton_support.TRITON_AVAILABLE else "torch"


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention (Deformable-DETR / TensorRT plugin contract).

    Args:
        value: [B, S, H, D], the levels' keys concatenated, S = sum of H_l * W_l.
        spatial_shapes: [L, 2] integer tensor or a sequence of (H_l, W_l) pairs.
        level_start_index: [L] first key of each level, or None (it follows from the shapes).
        sampling_locations: [B, Q, H, L, P, 2] normalised (x, y); outside [0, 1] reads zeros.
        attention_weights: [B, Q, H, L, P], already softmaxed over (L, P).

    Returns:
        [B, Q, H * D] in value's dtype: sum over (l, p) of weight * bilinear sample of level l at
        the location (grid_sample with zero padding and align_corners=False).

    Dtypes: float32, float16 or bfloat16. The Triton backend samples and accumulates in float32
    and accepts a different float dtype per tensor; the reference wants one dtype. Both are
    differentiable in value, sampling_locations and attention_weights.
    """
    if select_backend(value.device) == "triton":
        return ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)


def ms_deform_attn_fused(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: torch.Tensor | None,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention from a layer's raw projections.

    Equal to ``ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)`` with
    ``locations = reference_points[:, :, None, :, None] + sampling_offsets / (W_l, H_l)`` and
    ``weights = softmax(attention_logits, -1).view(B, Q, H, L, P)``.

    Args:
        value, spatial_shapes, level_start_index: as in :func:`ms_deform_attn`.
        reference_points: [B, Q, L, 2] normalised (x, y) per level.
        sampling_offsets: [B, Q, H, L, P, 2] in pixels of each level.
        attention_logits: [B, Q, H, L * P] before the softmax.

    Returns:
        [B, Q, H * D] in value's dtype. The Triton backend does the softmax and the location
        arithmetic inside the kernel in float32; gradients flow to value, reference_points,
        sampling_offsets and attention_logits with either backend.
    """
    if select_backend(value.device) == "triton":
        return ms_deform_attn_fused_triton(value, spatial_shapes, level_start_index, reference_points,
                                           sampling_offsets, attention_logits)
    return ms_deform_attn_fused_reference(value, spatial_shapes, level_start_index, reference_points,
                                          sampling_offsets, attention_logits)


def mask_pool(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """DeRIS mask pooling: mean over the (H/4, W/4) grid of sigmoid(masks) times pooled features.

    Args:
        mask_logits: [B, N, H, W] mask logits; H and W divisible by 4.
        features: [B, C, H, W], the same dtype (float32, float16 or bfloat16).

    Returns:
        [B, N, C]: ``sigmoid(bilinear(mask_logits, (H/4, W/4)))`` (align_corners=False) times
        ``AvgPool4(features)``, averaged over the grid. Differentiable in both inputs. The Triton
        backend never builds the [B, N, C, H/4, W/4] product and computes in float32.
    """
    if select_backend(mask_logits.device) == "triton":
        return mask_pool_triton(mask_logits, features)
    return mask_pool_reference(mask_logits, features)


__all__ = [
    "BACKENDS",
    "backend",
    "mask_pool",
    "mask_pool_reference",
    "mask_pool_triton",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "ms_deform_attn_fused_reference",
    "ms_deform_attn_fused_triton",
    "ms_deform_attn_reference",
    "ms_deform_attn_triton",
    "select_backend",
    "set_backend",
]
