"""Cognition branch: BEiT-3 on the 224 px image and the expression, projected to the decoder width."""

from __future__ import annotations

import torch
from torch import nn

from deris.config import DerisConfig
from deris.modeling.beit3 import BEiT3


class CognitionEncoder(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        dim = cfg.beit3.embed_dim
        self.beit3 = BEiT3(cfg.beit3)
        self.image_proj = nn.Linear(dim, cfg.hidden_dim)
        self.text_proj = nn.Linear(dim, cfg.hidden_dim)
        # The content queries come from the cognition side: N learned BEiT-3-width vectors,
        # projected to the decoder width. They do not depend on the input.
        self.init_query = nn.Embedding(cfg.num_queries, dim)
        self.query_proj = nn.Linear(dim, cfg.hidden_dim)

    def forward(
        self, img_mini: torch.Tensor, token_ids: torch.Tensor, text_pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """img_mini [B,3,224,224], token_ids [B,L] int64, text_pad_mask [B,L] (1 = padding)
        -> image features [B,C,14,14], text features [B,L,C] (padded positions are garbage)."""
        _, image_tokens, text_tokens = self.beit3(img_mini, token_ids, text_pad_mask)
        grid = self.beit3.grid
        img_feat = self.image_proj(image_tokens).transpose(1, 2).reshape(image_tokens.shape[0], -1, grid, grid)
        return img_feat, self.text_proj(text_tokens)

    def initial_queries(self) -> torch.Tensor:
        """The decoder's initial content queries [N, C] (a constant of the trained model)."""
        return self.query_proj(self.init_query.weight)
