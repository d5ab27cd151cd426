"""The exported graphs: small wrappers around the model's own submodules, and their I/O contract.

The cut follows ARCHITECTURE.md section 12.3 (E1 cognition, E2 perception, E3 decoder split per
round, E4 existence folded into the last round):

==========  ==============================================================  =====================================
graph       inputs                                                          outputs
==========  ==============================================================  =====================================
cognition   img_mini [B,3,224,224], token_ids [B,L] i64, text_pad_mask      img_feat [B,C,14,14], text_feat [B,L,C]
            [B,L] i64
perception  img [B,3,R,R]                                                   ms0 [B,C,R/32,R/32], ms1 (R/16), ms2 (R/8),
                                                                            mask_features [B,C,R/4,R/4]
round_0     mask_features, img_feat, text_feat, text_pad_mask               query_out [B,N,C], fused [B,C,R/4,R/4],
                                                                            mask_logits [B,N,R/4,R/4], refer_logits [B,N,2]
round_r     query [B,N,C], prev_mask_logits, fused, level_feature (ms{r-1}),  query_out, mask_logits, refer_logits
(r=1..3)    text_feat, text_pad_mask                                        (+ existence [B,1] for round_3)
decoder     ms0, ms1, ms2, mask_features, img_feat, text_feat, text_pad_mask  mask_logits, refer_logits, existence
==========  ==============================================================  =====================================

B is dynamic ("batch", 1..64). The resolution R is fixed per export: every shape-derived value
(Swin padding, sine tables, MSDA spatial shapes) is a Python int that constant-folds. The text
length L is fixed to the preset's ``max_text_len``: a static L keeps TensorRT optimisation profiles
to the batch axis alone, and the outputs at valid positions do not depend on how much padding
follows (ARCHITECTURE.md section 2.3), so shorter texts are simply padded to L.
``mask_logits`` are the low-resolution logits; the x4 upsampling is post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deris.config import DerisConfig
from deris.modeling.deris import DeRIS

GRAPH_NAMES = ("cognition", "perception", "round_0", "round_1", "round_2", "round_3", "decoder")
BATCH = "batch"
MAX_BATCH = 64
LEVEL_STRIDES = (32, 16, 8)  # ms0, ms1, ms2; round r > 0 attends to ms{r-1}

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype  # float32 tensors become float16 in fp16 exports
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def graph_specs(cfg: DerisConfig, resolution: int) -> dict[str, GraphSpec]:
    """The I/O contract of every graph for a preset's config at one resolution."""
    f32, i64 = torch.float32, torch.int64
    c, n, length, mini = cfg.hidden_dim, cfg.num_queries, cfg.max_text_len, cfg.mini_image_size
    grid = mini // cfg.beit3.patch_size
    r4 = resolution // 4

    def t(name: str, *shape: int, dtype: torch.dtype = f32) -> TensorSpec:
        return TensorSpec(name, dtype, (BATCH, *shape))

    levels = [t(f"ms{i}", c, resolution // s, resolution // s) for i, s in enumerate(LEVEL_STRIDES)]
    mask_features = t("mask_features", c, r4, r4)
    img_feat, text_feat = t("img_feat", c, grid, grid), t("text_feat", length, c)
    text_pad_mask = t("text_pad_mask", length, dtype=i64)
    query_out, fused = t("query_out", n, c), t("fused", c, r4, r4)
    mask_logits, refer_logits, existence = t("mask_logits", n, r4, r4), t("refer_logits", n, 2), t("existence", 1)

    specs = [
        GraphSpec("cognition", (t("img_mini", 3, mini, mini), t("token_ids", length, dtype=i64), text_pad_mask), (img_feat, text_feat)),
        GraphSpec("perception", (t("img", 3, resolution, resolution),), (*levels, mask_features)),
        GraphSpec("round_0", (mask_features, img_feat, text_feat, text_pad_mask), (query_out, fused, mask_logits, refer_logits)),
    ]
    for index in (1, 2, 3):
        level = levels[index - 1]
        inputs = (
            t("query", n, c), t("prev_mask_logits", n, r4, r4), fused, TensorSpec("level_feature", f32, level.shape),
            text_feat, text_pad_mask,
        )
        outputs = (query_out, mask_logits, refer_logits) + ((existence,) if index == 3 else ())
        specs.append(GraphSpec(f"round_{index}", inputs, outputs))
    specs.append(GraphSpec("decoder", (*levels, mask_features, img_feat, text_feat, text_pad_mask), (mask_logits, refer_logits, existence)))
    return {spec.name: spec for spec in specs}


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
    """Holds the decoder's initial queries as a constant: they depend on no input (section 12.3)."""

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
    """Round ``index`` (1..3): masked decoder layer index-1, heads, loopback; the last round also
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
    """All four rounds and the existence head in one graph."""

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
        query = self.batch_queries(mask_features.shape[0])
        query, mask_logits, refer_logits = self.decoder(
            [ms0, ms1, ms2], mask_features, img_feat, text_feat, text_pad_mask, query
        )
        existence, _ = self.existence(query, text_feat, text_pad_mask)
        return mask_logits, refer_logits, existence


def build_graph(name: str, model: DeRIS) -> nn.Module:
    """The eval-mode wrapper module exported as graph ``name``."""
    if model.query_sa != "per_sample":
        raise ValueError(f"only query_sa='per_sample' is exported (batch-invariant serving), the model uses {model.query_sa!r}")
    if name == "cognition":
        graph: nn.Module = CognitionGraph(model)
    elif name == "perception":
        graph = PerceptionGraph(model)
    elif name == "round_0":
        graph = RoundZeroGraph(model)
    elif name in ("round_1", "round_2", "round_3"):
        graph = RoundGraph(model, int(name[-1]))
    elif name == "decoder":
        graph = DecoderGraph(model)
    else:
        raise ValueError(f"unknown graph {name!r}; accepted: {', '.join(GRAPH_NAMES)}")
    return graph.eval()


def example_inputs(spec: GraphSpec, batch: int, dtype: torch.dtype = torch.float32, vocab_size: int = 3) -> tuple[torch.Tensor, ...]:
    """Random inputs of the graph's shapes, for tracing (values do not matter there)."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for tensor in spec.inputs:
        shape = tuple(batch if d == BATCH else int(d) for d in tensor.shape)
        if tensor.dtype == torch.int64:
            high = 2 if tensor.name == "text_pad_mask" else vocab_size
            tensors.append(torch.randint(0, high, shape, generator=generator))
        else:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
    return tuple(tensors)
