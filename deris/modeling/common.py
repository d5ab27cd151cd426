"""Small building blocks shared by the branches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zero whole samples' residual branches with probability ``rate``
    and scale the kept ones by 1 / (1 - rate); the identity at inference."""
    if not training or rate == 0.0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) >= rate
    return x * keep / (1.0 - rate)


def depth_rates(rate: float, depth: int) -> list[float]:
    """Per-layer stochastic-depth rates rising linearly from 0 to ``rate`` (the official schedule)."""
    return torch.linspace(0, rate, depth).tolist() if depth > 1 else [0.0] * depth


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout, batch-first.

    The packed ``in_proj_weight`` ([q; k; v] rows) keeps official checkpoint keys loadable as they
    are, while the explicit matmul/softmax keeps the ONNX graph simple and batch-dynamic
    (``nn.MultiheadAttention`` bakes sequence lengths into reshapes with the legacy exporter).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dropout = dropout  # on the attention probabilities, in training only
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Apply the q (0), k (1) or v (2) slice of the packed input projection."""
        dim = self.out_proj.in_features
        return F.linear(x, self.in_proj_weight[index * dim : (index + 1) * dim], self.in_proj_bias[index * dim : (index + 1) * dim])

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        blocked: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B,Lq,C], key/value [B,Lk,C]; ``blocked`` bool [B,heads,Lq,Lk] (True = may not
        attend); ``key_padding_mask`` [B,Lk] (nonzero = padding)."""
        batch, length, dim = query.shape
        q = self.split_heads(self.project(query, 0)) * (self.head_dim**-0.5)
        k = self.split_heads(self.project(key, 1))
        v = self.split_heads(self.project(value, 2))
        logits = q @ k.transpose(-2, -1)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask.bool()[:, None, None, :], float("-inf"))
        out = F.dropout(logits.softmax(-1), self.dropout, self.training) @ v
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))

    def value_only(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over a single key (softmax = 1): ``out_proj(v_proj(x))``."""
        return self.out_proj(self.project(x, 2))


class PostNormDecoderLayer(nn.Module):
    """Post-LN decoder layer over a text: self-attention, cross-attention, FFN (ReLU), each followed
    by its LayerNorm. ``cross_attn(query, key, value, key_padding_mask=...)`` decides how padded
    keys are masked (the official aligner uses -inf, ``Q2TCA`` an additive -100). ``dropout``
    applies in training to the self-attention probabilities and inside the FFN (the aligner: 0.1)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, cross_attn: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.self_attn = Attention(dim, num_heads, dropout)
        self.self_norm = nn.LayerNorm(dim)
        self.cross_attn = cross_attn
        self.cross_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(query + self.self_attn(query, query, query))
        x = self.cross_norm(x + self.cross_attn(x, key, value, key_padding_mask=key_padding_mask))
        hidden = F.dropout(F.relu(self.linear1(x)), self.dropout, self.training)
        return self.ffn_norm(x + F.dropout(self.linear2(hidden), self.dropout, self.training))


class MLP(nn.Module):
    """Linear layers with ReLU in between (Mask2Former's ``MLP``; keys ``layers.{i}``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_2d(height: int, width: int, num_feats: int, device: torch.device | None = None) -> torch.Tensor:
    """Mask2Former's normalised 2-D sine position encoding for an unpadded map -> [H*W, 2*num_feats].

    Channels are [pos_y, pos_x]; per axis, channel 2k is sin and 2k+1 is cos of
    e / 10000^(2k/num_feats) with e = (index + 1) / (size + 1e-6) * 2*pi (no -0.5 offset).
    The float32 operations follow the official cumsum-based code so values agree bit for bit.
    """
    scale = 2 * math.pi
    eps = 1e-6
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)

    def encode(e: torch.Tensor) -> torch.Tensor:
        p = e[:, None] / dim_t
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(height, width, num_feats)
    pos_x = encode(x)[None, :, :].expand(height, width, num_feats)
    return torch.cat((pos_y, pos_x), dim=2).reshape(height * width, 2 * num_feats)


def degenerate_sine_position_1d(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The official ``PositionEmbeddingSine1D`` as it really computes -> [length, dim].

    Its inverse-frequency vector is cast to int64, which zeroes every frequency but the first, so
    only channels 0 and 1 vary: (sin p, cos p, 0, 1, 0, 1, ...). Replicated exactly.
    """
    p = torch.arange(length, dtype=torch.float32, device=device)
    table = torch.zeros(length, dim, dtype=torch.float32, device=device)
    table[:, 1::2] = 1.0
    table[:, 0] = p.sin()
    table[:, 1] = p.cos()
    return table
