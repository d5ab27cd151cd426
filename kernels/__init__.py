"""Kernels behind DeRIS's two custom operations, each beside its plain-PyTorch reference.

* :func:`ms_deform_attn` — multi-scale deformable attention (pixel decoder).
* :func:`ms_deform_attn_fused` — the same, taking a layer's raw offsets and attention logits.
* :func:`mask_pool` — the loopback's mask pooling.
"""

from .mask_pool import mask_pool_reference
from .ms_deform_attn import ms_deform_attn_fused_reference, ms_deform_attn_reference

ms_deform_attn = ms_deform_attn_reference
ms_deform_attn_fused = ms_deform_attn_fused_reference
mask_pool = mask_pool_reference

__all__ = [
    "mask_pool",
    "mask_pool_reference",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "ms_deform_attn_fused_reference",
    "ms_deform_attn_reference",
]
