"""Mask pooling of the DeRIS loopback ("f_s" in the paper).

    pooled[b, n, c] = mean over the (H/4 x W/4) grid of
                      sigmoid(bilinear(mask_logits, (H/4, W/4)))[b, n] * AvgPool4(features)[b, c]

The official code builds the [B, N, C, H/4, W/4] product and averages it with a 5-D
AdaptiveAvgPool2d; the mean of a product over the grid is a matrix product, so the reference
below never materialises that tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_pool_reference(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """mask_logits [B, N, H, W], features [B, C, H, W] -> [B, N, C]; H and W divisible by 4."""
    height, width = mask_logits.shape[-2:]
    if height % 4 or width % 4:
        raise ValueError(f"mask_pool needs H and W divisible by 4, got {tuple(mask_logits.shape[-2:])}")
    size = (height // 4, width // 4)
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    pooled_features = F.avg_pool2d(features, kernel_size=4, stride=4)
    return torch.bmm(masks.flatten(2), pooled_features.flatten(2).transpose(1, 2)) / (size[0] * size[1])
