"""Existence head: the MultiGrainAligner (a 3-layer post-LN DETR decoder over the text) and the
no-target logit. The official post-processing reports it but decides "no target" from the scores."""

from __future__ import annotations

import torch
from torch import nn

from deris.config import DerisConfig
from deris.modeling.common import Attention, PostNormDecoderLayer


class ExistenceHead(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        heads = cfg.decoder.num_heads
        # self-attention -> LN -> text cross-attention (padded keys -inf) -> LN -> FFN -> LN, no
        # positional encodings; the official aligner trains with dropout on attention and FFN.
        drop = cfg.decoder.aligner_dropout
        self.layers = nn.ModuleList(
            PostNormDecoderLayer(dim, heads, cfg.decoder.aligner_ffn_dim, Attention(dim, heads, drop), drop)
            for _ in range(cfg.decoder.aligner_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)

    def forward(
        self, query_feat: torch.Tensor, text_feat: torch.Tensor, text_pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query_feat [B,N,C] (after the last loopback) -> (existence logit [B,1], aligned queries [B,N,C])."""
        z = query_feat
        for layer in self.layers:
            z = layer(z, text_feat, text_feat, text_pad_mask)
        z = self.norm(z)
        # The official head averages the per-query *logits*, then applies the sigmoid.
        return self.head(z).mean(dim=1), z
