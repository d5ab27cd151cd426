"""Query decoder: fusion, prediction heads, three masked-attention layers and four loopback rounds.

Round 0 runs the heads and loopback 0 on the initial queries; round r (1..num_layers) first runs
masked decoder layer r-1 over the pyramid level ``deris.topology.attended_level(r)`` (1/32, 1/16,
1/8, ...), with the attention mask derived from round r-1's masks, then the heads and loopback r.
Each round is a method so that export wrappers can cut the decoder into one graph per round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deris.config import DerisConfig
from deris.modeling.common import MLP, Attention, degenerate_sine_position_1d, sine_position_2d
from deris.modeling.loopback import LoopbackRound
from deris.topology import LEVEL_STRIDES, attended_level, num_rounds


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        return self.norm(query + self.attn(query + query_pos, memory + memory_pos, memory, blocked=blocked))


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        qk = query + query_pos
        return self.norm(query + self.attn(qk, qk, query))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(F.relu(self.linear1(x))))


class MaskedAttentionLayer(nn.Module):
    """Mask2Former decoder layer (post-LN): masked cross-attention, self-attention, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = CrossAttentionLayer(dim, num_heads)
        self.self_attn = SelfAttentionLayer(dim, num_heads)
        self.ffn = FFNLayer(dim, ffn_dim)

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        query = self.cross_attn(query, query_pos, memory, memory_pos, blocked)
        return self.ffn(self.self_attn(query, query_pos))


class LoopbackDecoder(nn.Module):
    def __init__(self, cfg: DerisConfig) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        dcfg = cfg.decoder
        self.num_heads = dcfg.num_heads
        self.query_sa_mode = cfg.query_sa
        # Pixel-decoder mask features and upsampled BEiT-3 image features, fused by a 1x1 conv.
        self.fusion = nn.Conv2d(2 * dim, dim, 1)
        self.layers = nn.ModuleList(MaskedAttentionLayer(dim, dcfg.num_heads, dcfg.ffn_dim) for _ in range(dcfg.num_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_embed = nn.Embedding(cfg.num_queries, dim)
        self.level_embed = nn.Embedding(len(LEVEL_STRIDES), dim)
        self.mask_embed = MLP(dim, dim, dim, 3)
        self.loopback = nn.ModuleList(
            LoopbackRound(dim, dcfg.num_heads, dcfg.text_attn_ffn_dim) for _ in range(num_rounds(cfg))
        )
        # Shared by all rounds: 2 classes, index 0 = "referred".
        self.refer_head = nn.Linear(dim, 2)

    @property
    def num_rounds(self) -> int:
        return len(self.loopback)

    def fuse(self, mask_features: torch.Tensor, img_feat: torch.Tensor) -> torch.Tensor:
        """[B,C,H/4,W/4] pixel-decoder features + [B,C,14,14] BEiT-3 features -> fused [B,C,H/4,W/4]."""
        up = F.interpolate(img_feat, size=mask_features.shape[-2:], mode="bilinear", align_corners=False)
        return self.fusion(torch.cat([mask_features, up], dim=1))

    def predict_masks(self, query: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        """Mask logits [B,N,H/4,W/4] from the LN-normalised queries (the query stream itself stays un-normalised)."""
        embed = self.mask_embed(self.decoder_norm(query))
        b, c, h, w = fused.shape
        return torch.bmm(embed, fused.flatten(2)).view(b, -1, h, w)

    @staticmethod
    def masked_positions(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """True where the next masked cross-attention may not look: sigmoid(resized logits) < 0.5
        -> bool [B,N,h,w] (before the fully-masked-row fix)."""
        resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        return resized.sigmoid() < 0.5

    def attention_block(self, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The boolean attention mask a layer uses: [B,heads,N,h*w], with fully masked rows
        re-opened (a query whose mask is empty at this level attends everywhere)."""
        blocked = self.masked_positions(mask_logits, size).flatten(2)
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        return blocked[:, None].expand(-1, self.num_heads, -1, -1)

    def level_memory(self, level: int, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pyramid level -> (memory [B,h*w,C] with its level embedding, sine positions [h*w,C])."""
        h, w = feature.shape[-2:]
        memory = feature.flatten(2).transpose(1, 2) + self.level_embed.weight[level]
        pos = sine_position_2d(int(h), int(w), feature.shape[1] // 2, feature.device).to(feature.dtype)
        return memory, pos

    def run_round(
        self,
        index: int,
        query: torch.Tensor,
        fused: torch.Tensor,
        text_feat: torch.Tensor,
        text_pad_mask: torch.Tensor,
        prev_mask_logits: torch.Tensor | None = None,
        level_feature: torch.Tensor | None = None,
        intermediates: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round ``index``: (masked layer index-1 if index > 0), heads, loopback.

        query [B,N,C]; fused [B,C,H/4,W/4]; for index > 0 also the previous round's mask logits and
        the pyramid level feature [B,C,h,w] that layer index-1 attends to.
        -> (query [B,N,C], mask logits [B,N,H/4,W/4], refer logits [B,N,2])
        """
        query_pos = self.query_embed.weight
        if index > 0:
            if prev_mask_logits is None or level_feature is None:
                raise ValueError(f"round {index} needs the previous round's mask logits and its pyramid level")
            memory, memory_pos = self.level_memory(attended_level(index), level_feature)
            blocked = self.attention_block(prev_mask_logits, (int(level_feature.shape[-2]), int(level_feature.shape[-1])))
            query = self.layers[index - 1](query, query_pos, memory, memory_pos, blocked)
        if intermediates is not None:
            intermediates["decoder_output"] = query
        mask_logits = self.predict_masks(query, fused)
        text_pos = degenerate_sine_position_1d(text_feat.shape[1], text_feat.shape[2], text_feat.device).to(text_feat.dtype)
        query, refer_logits = self.loopback[index](
            query, fused, mask_logits, text_feat, text_pos, text_pad_mask, self.refer_head, self.query_sa_mode, intermediates
        )
        return query, mask_logits, refer_logits

    def forward(
        self,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        img_feat: torch.Tensor,
        text_feat: torch.Tensor,
        text_pad_mask: torch.Tensor,
        query: torch.Tensor,
        rounds: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (final query [B,N,C], final mask logits [B,N,H/4,W/4], final refer logits [B,N,2]).

        ``rounds``: if a list is given, one dict of intermediates per round is appended to it.
        """
        fused = self.fuse(mask_features, img_feat)
        mask_logits: torch.Tensor | None = None
        for index in range(self.num_rounds):
            record: dict[str, torch.Tensor] | None = {} if rounds is not None else None
            level = multi_scale[attended_level(index)] if index > 0 else None
            if record is not None and level is not None:
                assert mask_logits is not None
                record["attn_mask_used"] = self.masked_positions(mask_logits, (int(level.shape[-2]), int(level.shape[-1])))
            query, mask_logits, refer_logits = self.run_round(
                index, query, fused, text_feat, text_pad_mask, mask_logits, level, record
            )
            if record is not None and rounds is not None:
                record.update(mask_logits_lowres=mask_logits, refer_logits=refer_logits, fused=fused)
                rounds.append(record)
        assert mask_logits is not None
        return query, mask_logits, refer_logits
