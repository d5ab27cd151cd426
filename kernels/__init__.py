"""Kernels behind DeRIS's two custom operations, each beside its plain-PyTorch reference.

* :func:`ms_deform_attn` — multi-scale deformable attention (pixel decoder).
* :func:`ms_deform_attn_fused` — the same, taking a layer's raw offsets and attention logits.
* :func:`mask_pool` — the loopback's mask pooling.

Each public function runs either the PyTorch reference ("torch") or the Triton kernels
("triton"). The backend is, in order of precedence:

1. the :func:`backend` context manager: it holds for the current context only (this thread, or
   this asyncio task), so an export forcing "torch" leaves a predictor in another thread alone;
2. the process-wide default of :func:`set_backend` (for scripts and command lines), which every
   thread sees;
3. the environment variable ``DERIS_KERNELS=torch|triton``, read at every call;
4. Triton for CUDA tensors when Triton is installed, the reference otherwise (CPU tensors).

Under ``torch.compile`` the choice is made when the function is traced: a :func:`backend` block
entered later does not retrace it (the process default and the environment variable do).

The Triton backend goes through custom operators made with ``torch.library.triton_op``
(``torch.ops.deris_kernels.msda_forward``, ``msda_fused_forward``, ``mask_pool_forward`` and their
``*_backward``), with fake implementations and a functional backward: torch.compile(fullgraph=True),
torch.export and AOTInductor trace them without a graph break, and on CUDA Inductor compiles the
Triton kernels inside. Traced on CPU, where the compiled Triton path needs a GPU, the operators
compute through the reference; eager CPU calls still run the kernels (interpreter, below).

Triton on CPU tensors runs through Triton's interpreter, which needs ``TRITON_INTERPRET=1`` in
the environment before deris is imported (Triton reads it when the kernels are defined).
Importing this package never needs Triton; asking for the Triton backend without it is an error.

On a GPU the MSDA forward autotunes its program size (``triton.autotune``, once per storage dtype,
head size and power-of-two bucket of the query count); ``DERIS_AUTOTUNE=0``, read at every call,
keeps the fixed configuration (no timing runs, e.g. inside a CUDA graph capture).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

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

# A new thread starts with an empty context (Python does not copy the parent's), so a block
# entered in one thread is invisible to every other: that is the point.
_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("deris_kernels_backend", default=None)
_process_backend: str | None = None


def _check_backend_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown kernel backend {name!r}; accepted: 'torch', 'triton'")
    return name


def set_backend(name: str | None) -> None:
    """Process-wide default: every thread's kernel calls run on ``"torch"`` or ``"triton"``; ``None`` clears it.

    Beats the ``DERIS_KERNELS`` environment variable; a :func:`backend` block beats it in its context.
    """
    global _process_backend
    _process_backend = None if name is None else _check_backend_name(name, "set_backend")


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """``with backend("torch"): ...`` — kernel calls made in this context (thread or asyncio task) use ``name``.

    ``None`` lifts an enclosing block's choice for the inner block. Other threads, and threads
    started inside the block, are unaffected (run them under ``contextvars.copy_context()`` to
    carry the choice over).
    """
    token = _context_backend.set(None if name is None else _check_backend_name(name, "backend"))
    try:
        yield
    finally:
        _context_backend.reset(token)


@torch.compiler.assume_constant_result
def _context_choice() -> str | None:
    # torch.compile cannot trace ContextVar.get: it calls this once while tracing and keeps the
    # result as a constant, so a compiled function keeps the backend() choice it was traced under.
    return _context_backend.get()


def select_backend(device: torch.device) -> str:
    """The backend a call with tensors on ``device`` uses now (see the module docstring)."""
    chosen = _context_choice() or _process_backend
    if chosen is not None:
        return chosen
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

    Dtypes: float32, float16 or bfloat16, each tensor its own. The Triton backend samples and
    accumulates in float32; the reference computes in the widest of the three dtypes. Both are
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
