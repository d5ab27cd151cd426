"""BEiT-3 multiway encoder, exactly as DeRIS configures torchscale 0.3.0.

Pre-LN with sub-LN (a LayerNorm before ``out_proj`` and inside the FFN), no relative position
bias, no layer scale, GELU (erf) and softmax in fp32. Every LayerNorm, projection and FFN exists
twice: the ``vision`` expert handles the 197 image tokens (CLS + 14x14 patches), the ``text``
expert the L text tokens; attention itself is joint over all 197 + L tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deris.config import BEiT3Config
from deris.modeling.common import depth_rates, drop_path

# fairseq-style learned positions start at row 2; rows 0-1 exist in the tables but are unused.
POSITION_OFFSET = 2


class Multiway(nn.Module):
    """Two copies of a module: ``vision`` for tokens [0, split), ``text`` for [split, end)."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.vision = make()
        self.text = make()

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return torch.cat([self.vision(x[:, :split]), self.text(x[:, split:])], dim=1)


class MultiwayAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.k_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.v_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.out_proj = Multiway(lambda: nn.Linear(dim, dim))
        self.inner_norm = Multiway(lambda: nn.LayerNorm(dim, eps=1e-5))

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(x, split) * (self.head_dim**-0.5))
        k = heads(self.k_proj(x, split))
        v = heads(self.v_proj(x, split))
        logits = (q @ k.transpose(-2, -1)).masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1, dtype=torch.float32).type_as(logits)
        out = (probs @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out_proj(self.inner_norm(out, split), split)


class FeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.norm = nn.LayerNorm(ffn_dim, eps=1e-5)
        self.fc2 = nn.Linear(ffn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).type_as(h)
        return self.fc2(self.norm(h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.drop_path_rate = drop_path_rate
        self.attn_norm = Multiway(lambda: nn.LayerNorm(dim, eps=1e-5))
        self.attn = MultiwayAttention(dim, cfg.num_heads)
        self.ffn_norm = Multiway(lambda: nn.LayerNorm(dim, eps=1e-5))
        self.ffn = Multiway(lambda: FeedForward(dim, cfg.ffn_dim))

    def forward(self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.attn_norm(x, split), split, key_padding_mask), self.drop_path_rate, self.training)
        return x + drop_path(self.ffn(self.ffn_norm(x, split), split), self.drop_path_rate, self.training)


class PositionTables(nn.Module):
    """BEiT-3's learned absolute positions, one table per modality (keys ``vision``, ``text``)."""

    def __init__(self, vision_rows: int, text_rows: int, dim: int) -> None:
        super().__init__()
        self.vision = nn.Embedding(vision_rows, dim)
        self.text = nn.Embedding(text_rows, dim)


class BEiT3(nn.Module):
    """Returns the final-LN tokens: CLS [B,D], image patches [B,196,D], text [B,L,D]."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.grid = cfg.img_size // cfg.patch_size
        self.num_image_tokens = self.grid * self.grid + 1
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_embed = nn.Embedding(cfg.vocab_size, dim)
        self.pos_embed = PositionTables(self.num_image_tokens + POSITION_OFFSET, cfg.max_text_positions, dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg, rate) for rate in depth_rates(cfg.drop_path_rate, cfg.depth))
        self.norm = Multiway(lambda: nn.LayerNorm(dim, eps=1e-5))

    def forward(
        self, image: torch.Tensor, token_ids: torch.Tensor, text_pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size = self.cfg.img_size
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"the cognition branch (BEiT-3) takes {size}x{size} images, got {tuple(image.shape[-2:])}")
        length = token_ids.shape[1]
        if length + POSITION_OFFSET > self.cfg.max_text_positions:
            raise ValueError(f"text length {length} exceeds BEiT-3's {self.cfg.max_text_positions - POSITION_OFFSET} positions")
        patches = self.patch_embed(image).flatten(2).transpose(1, 2)
        vision = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        vision = vision + self.pos_embed.vision.weight[POSITION_OFFSET : POSITION_OFFSET + self.num_image_tokens]
        text = self.text_embed(token_ids) + self.pos_embed.text.weight[POSITION_OFFSET : POSITION_OFFSET + length]
        x = torch.cat([vision, text], dim=1)
        split = self.num_image_tokens
        pad = torch.cat([torch.zeros_like(text_pad_mask[:, :1]).expand(-1, split), text_pad_mask], dim=1)
        # Padded tokens are zeroed once after the embedding and masked (-inf) as keys in every layer.
        x = x * (1 - pad.to(x.dtype)).unsqueeze(-1)
        pad = pad.bool()
        for layer in self.layers:
            x = layer(x, split, pad)
        x = self.norm(x, split)
        return x[:, 0], x[:, 1:split], x[:, split:]
