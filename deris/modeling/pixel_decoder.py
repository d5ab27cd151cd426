"""Mask2Former's MSDeformAttn pixel decoder as DeRIS configures it.

res3..res5 go through input projections (Conv1x1 + GroupNorm) and a stack of post-LN deformable
self-attention layers over the concatenated levels (order res5, res4, res3); res2 joins through a
one-level FPN whose lateral conv has a ReLU (upstream Mask2Former has none there).

The forward never copies between host and device nor synchronises: level sizes are Python ints,
reference points are built on the device, and the level start offsets follow from the sizes (the
kernels take ``level_start_index=None``), so the decoder can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import deris.kernels as kernels
from deris.config import DerisConfig
from deris.modeling.common import sine_position_2d

# (value, spatial_shapes, level_start_index, reference_points, sampling_offsets, attention_logits)
# -> [B, Q, H * D]: the signature of deris.kernels.ms_deform_attn_fused.
MSDAFunction = Callable[
    [torch.Tensor, list[tuple[int, int]], torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor
]
# The context holds the name of the function msda_function() chose, not the function: torch.compile
# can read a name as a constant (see _msda_override_name) and then trace the registered function.
_msda_functions: dict[str, MSDAFunction] = {}
_msda_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("deris_msda_function", default=None)


@torch.compiler.assume_constant_result
def _msda_override_name() -> str | None:
    # torch.compile cannot trace ContextVar.get: it calls this once while tracing, as a constant.
    return _msda_override.get()


@contextlib.contextmanager
def msda_function(function: MSDAFunction) -> Iterator[None]:
    """Within the block, deformable layers run in this context (thread or asyncio task) compute MSDA
    with ``function`` instead of ``deris.kernels.ms_deform_attn_fused``.

    The exporter uses it to pick how MSDA appears in a graph; a predictor running the same model
    in another thread meanwhile keeps the kernels: only this context's choice changes (the
    function is registered under a name unique to it, and stays registered). Under torch.compile
    the choice is the one in force when the layer is traced.
    """
    name = f"{function.__qualname__}@{id(function):x}"
    _msda_functions[name] = function
    token = _msda_override.set(name)
    try:
        yield
    finally:
        _msda_override.reset(token)


class DeformableSelfAttention(nn.Module):
    """MSDeformAttn: per query, H heads x L levels x P points sampled around a reference point."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        value_input: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        b, q, _ = query.shape
        h, lv, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(b, value_input.shape[1], h, -1)
        offsets = self.sampling_offsets(query).view(b, q, h, lv, p, 2)
        logits = self.attention_weights(query).view(b, q, h, lv * p)
        override = _msda_override_name()
        msda = kernels.ms_deform_attn_fused if override is None else _msda_functions[override]
        out = msda(value, spatial_shapes, None, reference_points, offsets, logits)
        return self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = DeformableSelfAttention(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, spatial_shapes) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, src, reference_points, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def reference_points(spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
    """Pixel centres of every level, normalised, (x, y) -> [S, 2] (valid ratios are all 1)."""
    points = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        points.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    return torch.cat(points, 0)


def conv_gn(in_ch: int, out_ch: int, kernel: int, groups: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=bias), nn.GroupNorm(groups, out_ch))


class PixelDecoder(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        pcfg = cfg.pixel_decoder
        res2, res3, res4, res5 = cfg.swin.channels
        self.num_levels = 3
        # Index 0 projects res5 (lowest resolution), 1 res4, 2 res3.
        self.input_proj = nn.ModuleList(conv_gn(c, dim, 1, pcfg.num_groups) for c in (res5, res4, res3))
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, dim))
        self.encoder = nn.ModuleList(
            DeformableEncoderLayer(dim, pcfg.num_heads, self.num_levels, pcfg.num_points, pcfg.ffn_dim)
            for _ in range(pcfg.num_layers)
        )
        self.lateral = conv_gn(res2, dim, 1, pcfg.num_groups)
        self.fpn_output = conv_gn(dim, dim, 3, pcfg.num_groups)
        self.mask_features = nn.Conv2d(dim, dim, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[res2, res3, res4, res5] -> ([1/32, 1/16, 1/8 maps], mask features at 1/4)."""
        res2, res3, res4, res5 = features
        levels = [proj(x) for proj, x in zip(self.input_proj, (res5, res4, res3))]
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in levels]
        dim = levels[0].shape[1]
        device = res5.device
        src = torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)
        pos = torch.cat(
            [sine_position_2d(h, w, dim // 2, device) + self.level_embed[i] for i, (h, w) in enumerate(shapes)], 0
        ).to(src.dtype)
        sizes = [h * w for h, w in shapes]
        # [S, L, 2]: every query carries the same reference point for each level. Float32 even in a
        # half-precision model: float16 would cost up to 2^-11 x level width in location (0.06 px
        # at 128 px), which the kernels, computing coordinates in float32, would otherwise keep.
        ref = reference_points(shapes, device)[None, :, None, :].expand(src.shape[0], -1, self.num_levels, -1)
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes)
        outs = [
            x.transpose(1, 2).reshape(src.shape[0], dim, h, w) for x, (h, w) in zip(src.split(sizes, dim=1), shapes)
        ]
        lateral = F.relu(self.lateral(res2))
        fpn = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = F.relu(self.fpn_output(fpn))
        return outs, self.mask_features(fpn)
