"""One loopback round: mask pooling -> query_SA -> query-to-text attention -> refer logits -> refer_proj.

The official ``query_SA`` feeds a batch-first [B,N,C] tensor to a sequence-first
``nn.MultiheadAttention``, so it attends over the *batch* axis: query slot n of image b attends to
slot n of every image in the batch, and at batch size 1 the softmax over a single key is 1. Two
modes are provided:

* ``per_sample`` (default, batch-invariant): the batch-size-1 behaviour for every sample,
  ``LN(q + out_proj(v_proj(q)))``. Mask pooling and query_SA's q/k projections only feed the
  softmax over that single key, so they are inert and are not computed.
* ``official_batch``: the official cross-image mixing, to reproduce batch-16 RefCOCO evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

import deris.kernels as kernels
from deris.config import QuerySAMode
from deris.modeling.common import Attention, PostNormDecoderLayer


class QuerySelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, mask_embedding: torch.Tensor | None, mode: QuerySAMode) -> torch.Tensor:
        if mode == "per_sample":
            return self.norm(query + self.attn.value_only(query))
        if mask_embedding is None:
            raise ValueError("official_batch query_SA needs the mask-pooled embedding")
        # Sequence axis = batch axis, as the official layer sees it: [N, B, C] batch-first.
        q = query.transpose(0, 1)
        qk = q + mask_embedding.transpose(0, 1)
        return self.norm(query + self.attn(qk, qk, q).transpose(0, 1))


class TextCrossAttention(nn.Module):
    """Queries attend to the text; padded keys get an additive -100 (not -inf), as official."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = query.shape
        head_dim = c // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.num_heads, head_dim).transpose(1, 2)

        q = heads(self.q(query)) * head_dim**-0.5
        logits = q @ heads(self.k(key)).transpose(-2, -1)
        logits = logits + key_padding_mask.to(logits.dtype)[:, None, None, :] * -100.0
        out = (logits.softmax(-1) @ heads(self.v(value))).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TextAttentionLayer(PostNormDecoderLayer):
    """Official ``Q2TCA`` (GlobalDecoderLayer, post-LN): query self-attention, text cross-attention
    (keys carry the 1-D text position table, padded keys get -100), FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__(dim, num_heads, ffn_dim, TextCrossAttention(dim, num_heads))


class LoopbackRound(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.query_sa = QuerySelfAttention(dim, num_heads)
        self.text_attn = TextAttentionLayer(dim, num_heads, ffn_dim)
        self.refer_proj = nn.Linear(2 * dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        fused_features: torch.Tensor,
        mask_logits: torch.Tensor,
        text_feat: torch.Tensor,
        text_pos: torch.Tensor,
        text_pad_mask: torch.Tensor,
        refer_head: nn.Linear,
        mode: QuerySAMode,
        intermediates: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query [B,N,C] -> (next query [B,N,C], refer logits [B,N,2])."""
        mask_embedding = kernels.mask_pool(mask_logits, fused_features) if mode == "official_batch" else None
        q = self.query_sa(query, mask_embedding, mode)
        refer_query = self.text_attn(q, text_feat + text_pos, text_feat, text_pad_mask)
        refer_logits = refer_head(refer_query)
        out = self.refer_proj(torch.cat([q, refer_query], dim=-1))
        if intermediates is not None:
            if mask_embedding is not None:
                intermediates["mask_embedding"] = mask_embedding
            intermediates.update(query_sa_out=q, query_refer=refer_query, query_after_loopback=out)
        return out, refer_logits
