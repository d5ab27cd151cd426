"""The exported graphs: small wrappers around the model's own submodules.

Which graphs there are, their inputs, outputs and the edges between them are declared once in
:mod:`deris.topology` (derived from the config and the resolution); this module only builds the
module that computes each one. B is dynamic (1..``MAX_BATCH``). The resolution R is fixed per
export: every shape-derived value (Swin padding, sine tables, MSDA spatial shapes) is a Python int
that constant-folds. The text length L is fixed to the preset's ``max_text_len``: a static L keeps
TensorRT optimisation profiles to the batch axis alone, and outputs at valid positions do not
depend on how much padding follows (docs/model.md, "Padding"). ``mask_logits`` are the
low-resolution logits; the x4 upsampling is post-processing.
"""

from __future__ import annotations

import torch
from torch import nn

from deris.modeling.deris import DeRIS
from deris.topology import BATCH, GraphSpec


class CognitionGraph(nn.Module):
    def __init__(self, model: DeRIS) -> None:
        super().__init__()
        self.cognition = model.cognition

    def forward(self, img_mini: torch.Tensor, token_ids: torch.Tensor, text_pad_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        img_feat, text_feat = self.cognition(img_mini, token_ids, text_pad_mask)
        return img_feat, text_feat


class PerceptionGraph(nn.Module):
    def __init__(self, model: DeRIS) -> None:
        super().__init__()
        self.perception = model.perception

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        (ms0, ms1, ms2), mask_features = self.perception(img)
        return ms0, ms1, ms2, mask_features


class _WithInitialQueries(nn.Module):
    """Holds the decoder's initial queries as a constant: they depend on no input (docs/deployment.md, "Graph cut")."""

    initial_queries: torch.Tensor

    def __init__(self, model: DeRIS) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.register_buffer("initial_queries", model.cognition.initial_queries().detach().clone())

    def batch_queries(self, batch: int) -> torch.Tensor:
        return self.initial_queries.unsqueeze(0).expand(batch, -1, -1)


class RoundZeroGraph(_WithInitialQueries):
    def forward(
        self, mask_features: torch.Tensor, img_feat: torch.Tensor, text_feat: torch.Tensor, text_pad_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        fused = self.decoder.fuse(mask_features, img_feat)
        query = self.batch_queries(mask_features.shape[0])
        query, mask_logits, refer_logits = self.decoder.run_round(0, query, fused, text_feat, text_pad_mask)
        return query, fused, mask_logits, refer_logits


class RoundGraph(nn.Module):
    """Round ``index`` (>= 1): masked decoder layer index-1, heads, loopback; the last round also
    runs the existence head on its output queries."""

    def __init__(self, model: DeRIS, index: int) -> None:
        super().__init__()
        if not 1 <= index < model.decoder.num_rounds:
            raise ValueError(f"round index must be in 1..{model.decoder.num_rounds - 1}, got {index}")
        self.index = index
        self.decoder = model.decoder
        self.existence = model.existence if index == model.decoder.num_rounds - 1 else None

    def forward(
        self,
        query: torch.Tensor,
        prev_mask_logits: torch.Tensor,
        fused: torch.Tensor,
        level_feature: torch.Tensor,
        text_feat: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        query, mask_logits, refer_logits = self.decoder.run_round(
            self.index, query, fused, text_feat, text_pad_mask, prev_mask_logits, level_feature
        )
        if self.existence is None:
            return query, mask_logits, refer_logits
        existence, _ = self.existence(query, text_feat, text_pad_mask)
        return query, mask_logits, refer_logits, existence


class DecoderGraph(_WithInitialQueries):
    """Every round and the existence head in one graph."""

    def __init__(self, model: DeRIS) -> None:
        super().__init__(model)
        self.existence = model.existence

    def forward(
        self,
        ms0: torch.Tensor,
        ms1: torch.Tensor,
        ms2: torch.Tensor,
        mask_features: torch.Tensor,
        img_feat: torch.Tensor,
        text_feat: torch.Tensor,
        text_pad_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        # One input per pyramid level (LEVEL_STRIDES), in the topology's order.
        query = self.batch_queries(mask_features.shape[0])
        query, mask_logits, refer_logits = self.decoder(
            [ms0, ms1, ms2], mask_features, img_feat, text_feat, text_pad_mask, query
        )
        existence, _ = self.existence(query, text_feat, text_pad_mask)
        return mask_logits, refer_logits, existence


def build_graph(spec: GraphSpec, model: DeRIS) -> nn.Module:
    """The eval-mode wrapper module exported as graph ``spec``."""
    if model.query_sa != "per_sample":
        raise ValueError(f"only query_sa='per_sample' is exported (batch-invariant serving), the model uses {model.query_sa!r}")
    if spec.kind == "cognition":
        graph: nn.Module = CognitionGraph(model)
    elif spec.kind == "perception":
        graph = PerceptionGraph(model)
    elif spec.kind == "round" and spec.round_index == 0:
        graph = RoundZeroGraph(model)
    elif spec.kind == "round":
        assert spec.round_index is not None
        graph = RoundGraph(model, spec.round_index)
    else:
        graph = DecoderGraph(model)
    return graph.eval()


def example_inputs(spec: GraphSpec, batch: int, dtype: torch.dtype = torch.float32, vocab_size: int = 3) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's shapes, for tracing (values do not matter there)."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for tensor in spec.inputs:
        shape = tuple(batch if d == BATCH else int(d) for d in tensor.shape)
        if tensor.dtype == "int64":
            high = 2 if tensor.name == "text_pad_mask" else vocab_size
            tensors.append(torch.randint(0, high, shape, generator=generator))
        else:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
    return tuple(tensors)
