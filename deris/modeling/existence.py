"""Existence head: the MultiGrainAligner (a 3-layer post-LN DETR decoder over the text) and the
no-target logit. The official post-processing reports it but decides "no target" from the scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deris.config import DerisConfig
from deris.modeling.common import Attention


class AlignerLayer(nn.Module):
    """self-attention -> LN -> text cross-attention -> LN -> FFN -> LN (no positional encodings)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor, text: torch.Tensor, text_pad_mask: torch.Tensor) -> torch.Tensor:
        z = self.self_norm(z + self.self_attn(z, z, z))
        z = self.cross_norm(z + self.cross_attn(z, text, text, key_padding_mask=text_pad_mask))
        return self.ffn_norm(z + self.linear2(F.relu(self.linear1(z))))


class ExistenceHead(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        heads = cfg.decoder.num_heads
        self.layers = nn.ModuleList(
            AlignerLayer(dim, heads, cfg.decoder.aligner_ffn_dim) for _ in range(cfg.decoder.aligner_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(
        self, query_feat: torch.Tensor, text_feat: torch.Tensor, text_pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query_feat [B,N,C] (after the last loopback) -> (existence logit [B,1], aligned queries [B,N,C])."""
        z = query_feat
        for layer in self.layers:
            z = layer(z, text_feat, text_pad_mask)
        z = self.norm(z)
        # The official head averages the per-query *logits*, then applies the sigmoid.
        return self.head(z).mean(dim=1), z
