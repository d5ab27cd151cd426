"""The pipeline's topology, declared once: the graph cut, every graph's inputs and outputs, and the
edges between graphs, all derived from a config and a perception resolution.

Everything that runs the model as a chain of pieces uses this declaration: the decoder's round
loop (:func:`num_rounds`, :func:`attended_level`), the export wrappers and their ONNX contract,
the ONNX Runtime verification, the ONNX pipeline runtime (:func:`run_chain`) and the Triton
ensemble generator. Torch-free, so the tools that only plan (the ensemble generator, ``--help``)
need no torch.

The cut (docs/deployment.md, "Graph cut")::

    img_mini, token_ids, text_pad_mask -> cognition  -> img_feat, text_feat
    img                                -> perception -> ms0 (1/32), ms1 (1/16), ms2 (1/8), mask_features (1/4)
    round_0:  fusion, heads and loopback 0 on the initial queries -> query_0, fused, mask_logits_0, refer_logits_0
    round_r:  masked decoder layer r-1 over level attended_level(r), heads, loopback r
              (query_{r-1}, mask_logits_{r-1}, fused, ms{level}) -> query_r, mask_logits_r, refer_logits_r
              (+ existence for the last round)
    decoder:  all rounds and the existence head in one graph (the "fused" layout)

A tensor's ``name`` is its name inside its graph; its ``value`` is the pipeline-wide name of the
edge it reads or writes (``query_out`` of ``round_1`` is the value ``query_1``, which ``round_2``
reads as its input ``query``). Values are unique, so a chain is a DAG and an ensemble can map
them one to one. Both layouts end in the same final values.

Shapes hold ints for static dimensions and :data:`BATCH` for the dynamic batch axis; dtypes are
``"float"`` (the graph's float precision) or ``"int64"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from deris.config import DerisConfig

# Pyramid levels the pixel decoder hands the query decoder, lowest resolution first: ms0, ms1, ms2.
LEVEL_STRIDES = (32, 16, 8)
MASK_STRIDE = 4  # mask features and mask logits
BATCH = "batch"
MAX_BATCH = 64
LAYOUTS = ("rounds", "fused")
Layout = Literal["rounds", "fused"]
PIPELINE_INPUTS = ("img", "img_mini", "token_ids", "text_pad_mask")
FINAL_OUTPUTS = ("mask_logits", "refer_logits", "existence")

Dim = int | str


def num_rounds(cfg: DerisConfig) -> int:
    """Loopback rounds: one on the initial queries, then one after each masked decoder layer."""
    return cfg.decoder.num_layers + 1


def attended_level(round_index: int) -> int:
    """The pyramid level (index into :data:`LEVEL_STRIDES`) that round ``round_index`` (>= 1) attends to:
    decoder layer r-1 uses level (r-1) mod 3, i.e. 1/32, 1/16, 1/8, then around again (Mask2Former)."""
    if round_index < 1:
        raise ValueError(f"round 0 attends to no pyramid level; rounds 1.. do, got {round_index}")
    return (round_index - 1) % len(LEVEL_STRIDES)


@dataclass(frozen=True)
class TensorSpec:
    name: str  # inside the graph
    dtype: str  # "float" or "int64"
    shape: tuple[Dim, ...]
    value: str  # the pipeline value (edge) it reads or writes


@dataclass(frozen=True)
class GraphSpec:
    name: str
    kind: Literal["cognition", "perception", "round", "decoder"]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    round_index: int | None = None

    def output(self, name: str) -> TensorSpec:
        for tensor in self.outputs:
            if tensor.name == name:
                return tensor
        raise KeyError(f"graph {self.name} has no output {name!r}")


@dataclass(frozen=True)
class Topology:
    """Every graph of the cut for one config at one perception resolution."""

    resolution: int
    num_rounds: int
    inputs: tuple[TensorSpec, ...]  # the pipeline's inputs (what preprocessing produces)
    graphs: Mapping[str, GraphSpec]  # in execution order: encoders, rounds, then the fused decoder

    @property
    def graph_names(self) -> tuple[str, ...]:
        return tuple(self.graphs)

    @property
    def round_names(self) -> tuple[str, ...]:
        return tuple(f"round_{r}" for r in range(self.num_rounds))

    def layout(self, layout: str) -> tuple[GraphSpec, ...]:
        """The graphs one layout runs, in order: the encoders, then the rounds or the fused decoder."""
        if layout == "rounds":
            names: tuple[str, ...] = ("cognition", "perception", *self.round_names)
        elif layout == "fused":
            names = ("cognition", "perception", "decoder")
        else:
            raise ValueError(f"unknown decoder layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
        return tuple(self.graphs[n] for n in names)

    def final_values(self) -> dict[str, str]:
        """Final output name -> the value that holds it (the same in both layouts)."""
        last = self.num_rounds - 1
        return {"mask_logits": f"mask_logits_{last}", "refer_logits": f"refer_logits_{last}", "existence": "existence"}

    def needed(self, graphs: tuple[str, ...] | list[str]) -> tuple[GraphSpec, ...]:
        """``graphs`` plus every graph they depend on, in execution order (the fused decoder is
        never a dependency: the rounds produce its values too)."""
        producers = {t.value: g.name for g in self.layout("rounds") for t in g.outputs}
        wanted = set(graphs)
        stack = list(graphs)
        while stack:
            for tensor in self.graphs[stack.pop()].inputs:
                source = producers.get(tensor.value)
                if source is not None and source not in wanted:
                    wanted.add(source)
                    stack.append(source)
        return tuple(g for g in self.graphs.values() if g.name in wanted)

    def consumed_values(self, layout: str) -> set[str]:
        """Values some graph of ``layout`` reads, or that are final outputs."""
        return {t.value for g in self.layout(layout) for t in g.inputs} | set(self.final_values().values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description, stored in export manifests so consumers need no config."""
        return {"resolution": self.resolution, "num_rounds": self.num_rounds, "inputs": [asdict(t) for t in self.inputs],
                "graphs": {name: asdict(g) for name, g in self.graphs.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Topology:
        def tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t["value"]) for t in items)

        graphs = {
            name: GraphSpec(name, g["kind"], tensors(g["inputs"]), tensors(g["outputs"]), g.get("round_index"))
            for name, g in data["graphs"].items()
        }
        return cls(int(data["resolution"]), int(data["num_rounds"]), tensors(data["inputs"]), graphs)


def pipeline_topology(cfg: DerisConfig, resolution: int) -> Topology:
    """The topology of ``cfg`` at perception resolution ``resolution`` (a multiple of 32)."""
    if resolution <= 0 or resolution % LEVEL_STRIDES[0]:
        raise ValueError(f"resolution must be a positive multiple of {LEVEL_STRIDES[0]}, got {resolution}")
    c, n, length, mini = cfg.hidden_dim, cfg.num_queries, cfg.max_text_len, cfg.mini_image_size
    grid = mini // cfg.beit3.patch_size
    side = resolution // MASK_STRIDE
    rounds = num_rounds(cfg)

    def t(name: str, *shape: int, value: str | None = None, dtype: str = "float") -> TensorSpec:
        return TensorSpec(name, dtype, (BATCH, *shape), value or name)

    levels = [t(f"ms{i}", c, resolution // s, resolution // s) for i, s in enumerate(LEVEL_STRIDES)]
    mask_features = t("mask_features", c, side, side)
    img_feat, text_feat = t("img_feat", c, grid, grid), t("text_feat", length, c)
    text_pad_mask = t("text_pad_mask", length, dtype="int64")
    inputs = (t("img", 3, resolution, resolution), t("img_mini", 3, mini, mini), t("token_ids", length, dtype="int64"), text_pad_mask)

    def round_outputs(r: int) -> list[TensorSpec]:
        return [
            t("query_out", n, c, value=f"query_{r}"),
            t("mask_logits", n, side, side, value=f"mask_logits_{r}"),
            t("refer_logits", n, 2, value=f"refer_logits_{r}"),
        ]

    existence = t("existence", 1)
    graphs = [
        GraphSpec("cognition", "cognition", (inputs[1], inputs[2], text_pad_mask), (img_feat, text_feat)),
        GraphSpec("perception", "perception", (inputs[0],), (*levels, mask_features)),
    ]
    first = round_outputs(0)
    graphs.append(
        GraphSpec("round_0", "round", (mask_features, img_feat, text_feat, text_pad_mask),
                  (first[0], t("fused", c, side, side), *first[1:]), round_index=0)
    )
    for r in range(1, rounds):
        level = levels[attended_level(r)]
        ins = (
            t("query", n, c, value=f"query_{r - 1}"),
            t("prev_mask_logits", n, side, side, value=f"mask_logits_{r - 1}"),
            t("fused", c, side, side),
            TensorSpec("level_feature", "float", level.shape, level.value),
            text_feat,
            text_pad_mask,
        )
        outs = round_outputs(r) + ([existence] if r == rounds - 1 else [])
        graphs.append(GraphSpec(f"round_{r}", "round", ins, tuple(outs), round_index=r))
    last = round_outputs(rounds - 1)
    graphs.append(
        GraphSpec("decoder", "decoder", (*levels, mask_features, img_feat, text_feat, text_pad_mask), (last[1], last[2], existence))
    )
    return Topology(resolution, rounds, inputs, {g.name: g for g in graphs})


Array = TypeVar("Array")


def run_chain(
    graphs: tuple[GraphSpec, ...] | list[GraphSpec],
    run_graph: Callable[[GraphSpec, dict[str, Array]], Mapping[str, Array]],
    inputs: Mapping[str, Array],
) -> dict[str, Array]:
    """Run ``graphs`` in order, each on the values its inputs name, and return every value.

    ``run_graph(spec, feeds)`` takes feeds keyed by the graph's own tensor names and returns its
    outputs keyed the same way; ``inputs`` are the pipeline inputs (:data:`PIPELINE_INPUTS`).
    """
    values: dict[str, Array] = dict(inputs)
    for spec in graphs:
        missing = [t.value for t in spec.inputs if t.value not in values]
        if missing:
            raise KeyError(f"graph {spec.name} needs values {missing}, which nothing before it produces")
        outputs = run_graph(spec, {t.name: values[t.value] for t in spec.inputs})
        values.update({t.value: outputs[t.name] for t in spec.outputs})
    return values
