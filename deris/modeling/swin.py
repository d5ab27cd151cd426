"""Swin Transformer backbone of the perception branch (the detectron2 "D2Swin" variant DeRIS uses).

Works at any input size: the patch embedding pads right/bottom to the patch size, every block
pads its token map right/bottom to a window multiple (after norm1, so pads are exact zeros, and
padded tokens are *not* masked as keys), shifted blocks add a -100 region mask, and patch merging
pads odd maps. Returns the four stage outputs after their own LayerNorms.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from deris.config import SwinConfig
from deris.modeling.common import depth_rates, drop_path


def relative_position_index(window: int) -> torch.Tensor:
    """Standard Swin index into the (2w-1)^2 bias table: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B,H,W,C] -> [B*nW, w*w, C]"""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """[B*nW, w*w, C] -> [B,H,W,C]"""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive [nW, w*w, w*w] mask (0 / -100) separating the regions that the cyclic shift
    brings together, built on the padded (h, w) grid."""
    regions = torch.zeros(1, h, w, 1, device=device)
    count = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, hs, ws, :] = count
            count += 1
    ids = window_partition(regions, window).squeeze(-1)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    relative_position_index: torch.Tensor

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Derived from the window size; the checkpoint's copy is only checked against it.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        windows, n, c = x.shape
        qkv = self.qkv(x).reshape(windows, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(windows // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(windows, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor | None) -> torch.Tensor:
        b, _, c = x.shape
        win = self.window
        y = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (win - h % win) % win, (win - w % win) % win
        y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, win), shift_mask if self.shift else None), win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(y[:, :h, :w, :].reshape(b, h * w, c), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # Neighbour order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(
        self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float, downsample: bool, drop_path_rates: list[float]
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else self.shift, mlp_ratio, drop_path_rates[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        hp = math.ceil(h / self.window) * self.window
        wp = math.ceil(w / self.window) * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.shift, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a strided conv) and a LayerNorm over channels (keys ``proj``, ``norm``)."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)


class SwinTransformer(nn.Module):
    """[B,3,H,W] -> [res2, res3, res4, res5] at strides 4, 8, 16, 32 (channels C, 2C, 4C, 8C)."""

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.embed_dim, cfg.patch_size)
        channels = cfg.channels
        stages = len(cfg.depths)
        # Stochastic-depth rates rise linearly over all blocks of all stages.
        rates = depth_rates(cfg.drop_path_rate, sum(cfg.depths))
        starts = [sum(cfg.depths[:i]) for i in range(stages)]
        self.layers = nn.ModuleList(
            SwinStage(channels[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, i < stages - 1,
                      rates[starts[i] : starts[i] + cfg.depths[i]])
            for i in range(stages)
        )
        for i, c in enumerate(channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        p = self.cfg.patch_size
        h, w = image.shape[-2:]
        x = self.patch_embed.proj(F.pad(image, (0, (p - w % p) % p, 0, (p - h % p) % p)))
        b, c, h, w = x.shape
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        outs = []
        for i, module in enumerate(self.layers):
            stage = cast(SwinStage, module)  # nn.ModuleList yields plain Modules to the type checker
            x = stage(x, h, w)
            out = getattr(self, f"norm{i}")(x)
            outs.append(out.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x, h, w)
                h, w = (h + 1) // 2, (w + 1) // 2
        return outs
