"""Preflight of an ONNX export against TensorRT's ONNX parser, without TensorRT.

``deris-export trt --check-only`` runs it alone; every build runs it first. Each graph is checked
against what the parser of the *targeted* TensorRT release supports (``--trt-version``; default:
the installed TensorRT, else :data:`DEFAULT_TARGET`):

* ``opset``: the default-domain opset inside the parser's range;
* ``operators``: every node's operator is one the parser imports (at that release);
* ``dtypes``: the tensor types each operator accepts (INT64 is native since TensorRT 9, but the
  MSDA plugins want INT32 tables; UINT8 only at the network's boundary);
* ``restrictions``: the documented per-operator limits that can apply to exported graphs
  (constant ``axes``, Resize modes, GridSample only below opset 20, ...);
* ``dynamic dims``: only the batch axis of the inputs is dynamic, covered by the optimisation
  profile that will be built (TensorRT infers every other size from the inputs');
* ``size``: the protobuf below 2 GiB, external data present;
* ``plugins``: custom nodes resolve to a plugin that exists at that release.

The facts come from onnx-tensorrt's ``docs/operators.md`` (10.0 and 10.15 tables) and
``docs/Changelog.md``, TensorRT's ``CHANGELOG.md`` and the issues cited next to each rule (see
docs/deployment.md, "MSDA in graphs" and "Precision"). Shapes and types come from polygraphy's ``InferShapes``.
An operator the table does not list is a FAIL, so a new one cannot slip through unchecked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from deris.export.manifest import read_manifest

# The TensorRT releases the rules below were written for.
KNOWN_RELEASES = tuple((10, minor) for minor in range(16))
# The release of the tensorrt-stubs the code is type-checked against, and the last one before the
# GridSample-MSDA miscompilation of 10.14 (NVIDIA/TensorRT#4813).
DEFAULT_TARGET = "10.13"

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

# MultiscaleDeformableAttnPlugin_TRT: version 1 in every TensorRT 10; version 2 (IPluginV3) since
# 10.11, which deprecates version 1.
PLUGIN_VERSIONS = ("1", "2")
MSDA_PLUGIN_V2_SINCE = (10, 11)
# Python AOT plugins (the triton-plugin MSDA node) are parsed from 10.9 on.
AOT_PLUGINS_SINCE = (10, 9)


class PreflightError(ValueError):
    """A preflight request that cannot be run (unknown version string, not an export directory)."""


@dataclass(frozen=True, order=True)
class TrtTarget:
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> TrtTarget:
        """``"10.13"`` or a full version such as ``"10.13.0.35"`` (TensorRT's ``__version__``)."""
        match = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.\d+)*\s*", text)
        if not match:
            raise PreflightError(f"TensorRT version must look like 10.13 (or 10.13.0.35), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def at_least(self, release: tuple[int, int]) -> bool:
        return (self.major, self.minor) >= release

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class PreflightRow:
    graph: str
    check: str
    status: str  # PASS, WARN or FAIL
    detail: str


# --- the operator table ------------------------------------------------------------------------

FLOATS = ("FP32", "FP16", "BF16")
INTS = ("INT32", "INT64")
ANY = (*FLOATS, *INTS, "BOOL")

ONNX_TYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16", TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
}


@dataclass(frozen=True)
class OpRule:
    """One row of the parser's support matrix: the types of the operator's data input."""

    types: tuple[str, ...]
    data_input: int = 0  # the input the "Supported Types" column describes (Where's is its second)
    since: tuple[int, int] = (10, 0)


OPERATORS: dict[str, OpRule] = {
    **{op: OpRule((*FLOATS, *INTS)) for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "Less",
        "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Range", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
        "ScatterElements", "ScatterND", "Sign", "Sub", "Sum", "TopK")},
    **{op: OpRule(ANY) for op in (
        "Concat", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "Reshape", "Shape", "Size",
        "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze", "Constant", "ConstantOfShape")},
    **{op: OpRule(FLOATS) for op in (
        "AveragePool", "BatchNormalization", "Ceil", "Clip", "Conv", "ConvTranspose", "Cos", "CumSum", "Einsum", "Elu",
        "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "GroupNormalization", "HardSigmoid",
        "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "MatMul", "MaxPool", "Pow",
        "Reciprocal", "Resize", "Round", "Sigmoid", "Sin", "Softmax", "Softplus", "Sqrt", "Tanh")},
    "Cast": OpRule((*ANY, "UINT8")),
    "Gelu": OpRule((*FLOATS, *INTS)),
    "GridSample": OpRule(("FP32", "FP16")),  # 4-D only below 11.2
    "Where": OpRule(ANY, data_input=1),
    "And": OpRule(("BOOL",)), "Or": OpRule(("BOOL",)), "Not": OpRule(("BOOL",)), "Xor": OpRule(("BOOL",)),
    "IsNaN": OpRule((*FLOATS, *INTS)),
    "Attention": OpRule(FLOATS, since=(10, 14)),
}


# --- per-operator restrictions -------------------------------------------------------------------


@dataclass(frozen=True)
class GraphFacts:
    """What the restriction rules look up: constants, tensor types, the opset, the target."""

    constants: frozenset[str]  # initializers and Constant outputs
    types: dict[str, int]  # value name -> TensorProto elem type
    opset: int
    target: TrtTarget
    consumed: frozenset[str]  # values some node or the graph output reads

    def is_constant(self, name: str) -> bool:
        return name == "" or name in self.constants


Rule = Callable[[onnx.NodeProto, GraphFacts], Iterator[tuple[str, str]]]  # -> (status, detail)
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(check: Rule) -> Rule:
        for op in ops:
            RULES[op] = check
        return check

    return register


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


@rule(*(op for op in OPERATORS if op.startswith("Reduce")))
def _reduce_axes(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if not facts.is_constant(_input(node, 1)):
        yield FAIL, "`axes` must be an initializer"


def _axes_constant_before(release: tuple[int, int], index: int) -> Rule:
    def check(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
        if not facts.target.at_least(release) and not facts.is_constant(_input(node, index)):
            yield FAIL, f"`axes` must be a constant before TensorRT {release[0]}.{release[1]}"

    return check


rule("Slice")(_axes_constant_before((10, 3), 3))
rule("Pad")(_axes_constant_before((10, 4), 3))
rule("Squeeze", "Unsqueeze")(_axes_constant_before((10, 7), 1))
rule("CumSum")(_axes_constant_before((10, 8), 1))


@rule("TopK")
def _topk(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if not facts.is_constant(_input(node, 1)):
        yield FAIL, "`K` must be an initializer"


RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@rule("Resize")
def _resize(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    mode = _attr(node, "mode", "nearest")
    coordinates = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear"):
        yield FAIL, f"mode {mode!r} (supported: nearest, linear)"
    if coordinates not in RESIZE_COORDINATES:
        yield FAIL, f"coordinate_transformation_mode {coordinates!r}"
    if mode == "nearest" and _attr(node, "nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST:
        yield FAIL, f"nearest_mode {_attr(node, 'nearest_mode')!r}"
    if _attr(node, "antialias", 0):
        yield FAIL, "antialiasing is not supported"
    if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        yield FAIL, "only the `stretch` aspect ratio policy is supported"


@rule("LayerNormalization")
def _layer_norm(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if any(name in facts.consumed for name in node.output[1:]):
        yield FAIL, "only the first output `Y` is supported"


@rule("MaxPool")
def _max_pool(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if len(node.output) > 1 and node.output[1] in facts.consumed:
        yield FAIL, "the `Indices` output is not supported"


@rule("Einsum")
def _einsum(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if facts.target.at_least((10, 12)):
        return
    operands = str(_attr(node, "equation", "")).replace(" ", "").split("->")[0].split(",")
    if any("..." in term for term in operands):
        yield FAIL, "ellipses need TensorRT 10.12"
    if any(len(set(term)) != len(term) for term in operands):
        yield FAIL, "diagonal operations need TensorRT 10.12"


@rule("GridSample")
def _grid_sample(node: onnx.NodeProto, facts: GraphFacts) -> Iterator[tuple[str, str]]:
    if facts.opset >= 20:
        # The parser compares the opset-16 mode names; opset 20 renamed them and TensorRT silently
        # samples nearest (NVIDIA/TensorRT#4646, reproduced on 10.13 and 11.1).
        yield FAIL, f"opset {facts.opset}: TensorRT reads GridSample's opset-20 modes as nearest; export at opset < 20"
    if facts.target == TrtTarget(10, 14):
        yield WARN, ("TensorRT 10.14 miscomputes GridSample-decomposed deformable attention even in fp32 "
                     "(NVIDIA/TensorRT#4813); prefer --msda trt-plugin or triton-plugin")


# --- plugins --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginRule:
    """A custom node the parser hands to a plugin: which inputs must be INT32, when it exists."""

    int32_inputs: tuple[int, ...]
    float_types: tuple[str, ...]
    check: Callable[[onnx.NodeProto, TrtTarget, str | None], Iterator[tuple[str, str]]]


def _msda_trt_plugin(node: onnx.NodeProto, target: TrtTarget, version: str | None) -> Iterator[tuple[str, str]]:
    version = version or str(_attr(node, "plugin_version", "1"))
    if version == "2" and not target.at_least(MSDA_PLUGIN_V2_SINCE):
        yield FAIL, f"MultiscaleDeformableAttnPlugin_TRT version 2 needs TensorRT >= 10.11 (target {target}); use version 1"
    elif version == "1" and target.at_least(MSDA_PLUGIN_V2_SINCE):
        yield WARN, "MultiscaleDeformableAttnPlugin_TRT version 1 is deprecated since TensorRT 10.11; use version 2"
    elif version not in PLUGIN_VERSIONS:
        yield FAIL, f"MultiscaleDeformableAttnPlugin_TRT has versions 1 and 2, not {version!r}"


def _triton_aot_plugin(node: onnx.NodeProto, target: TrtTarget, _version: str | None) -> Iterator[tuple[str, str]]:
    from deris.export.triton_plugin import PLUGIN_NAMESPACE

    if not target.at_least(AOT_PLUGINS_SINCE):
        yield FAIL, f"ahead-of-time Python plugins need TensorRT >= 10.9 (target {target})"
    if _attr(node, "plugin_namespace") != PLUGIN_NAMESPACE or not _attr(node, "aot", 0):
        yield FAIL, f"the node needs plugin_namespace={PLUGIN_NAMESPACE!r} and aot=1 for the parser to pick the AOT plugin"


def plugin_rules() -> dict[tuple[str, str], PluginRule]:
    """(domain, op_type) -> rule, for the custom nodes this project exports."""
    from deris.export.msda import PLUGIN_DOMAIN, PLUGIN_OP
    from deris.export.triton_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE

    return {
        (PLUGIN_DOMAIN, PLUGIN_OP): PluginRule((1, 2), ("FP32", "FP16"), _msda_trt_plugin),
        (PLUGIN_NAMESPACE, PLUGIN_NAME): PluginRule((1,), ("FP32",), _triton_aot_plugin),
    }


# --- the checks -----------------------------------------------------------------------------------


def _max_opset(target: TrtTarget) -> int:
    # Documented ranges: 9-20 for 10.0, 9-24 for 10.15; the releases between are held to 10.0's.
    return 24 if target.at_least((10, 15)) else 20


def _load(path: Path) -> onnx.ModelProto:
    from polygraphy.backend.onnx import InferShapes, OnnxFromPath
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        # Weights stay on disk: types and shapes are all the checks need. ONNX Runtime's shape
        # inference would stop at the custom nodes.
        model: onnx.ModelProto = InferShapes(OnnxFromPath(str(path), ignore_external_data=True), allow_onnxruntime=False)()
    return model


def _facts(model: onnx.ModelProto, target: TrtTarget) -> GraphFacts:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphFacts(frozenset(constants), types, opset, target, frozenset(consumed))


def _type_name(facts: GraphFacts, value: str) -> str | None:
    if value not in facts.types:
        return None
    code = facts.types[value]
    return ONNX_TYPE_NAMES.get(code, f"type {code}")


def _summary(problems: Sequence[tuple[str, str]], ok: str) -> tuple[str, str]:
    if not problems:
        return PASS, ok
    status = FAIL if any(s == FAIL for s, _ in problems) else WARN
    shown = sorted({d for s, d in problems if s == status})
    return status, "; ".join(shown[:6]) + (f"; ... ({len(shown) - 6} more)" if len(shown) > 6 else "")


Problems = list[tuple[str, str]]  # (status, detail)


@dataclass
class _Findings:
    operators: Problems = field(default_factory=list)
    dtypes: Problems = field(default_factory=list)
    restrictions: Problems = field(default_factory=list)
    plugins: Problems = field(default_factory=list)
    used_plugins: set[str] = field(default_factory=set)


def _check_plugin_node(node: onnx.NodeProto, plugin: PluginRule, facts: GraphFacts, plugin_version: str | None,
                       found: _Findings) -> None:
    found.used_plugins.add(node.op_type)
    found.plugins += plugin.check(node, facts.target, plugin_version)
    for index, value in enumerate(node.input):
        kind = _type_name(facts, value)
        wanted = ("INT32",) if index in plugin.int32_inputs else plugin.float_types
        if kind not in wanted:
            found.dtypes.append((FAIL, f"{node.op_type} input {index} is {kind}, the plugin takes {'/'.join(wanted)}"))


def _check_node(node: onnx.NodeProto, facts: GraphFacts, found: _Findings) -> None:
    op = OPERATORS.get(node.op_type)
    if op is None:
        found.operators.append((FAIL, f"{node.op_type} is not in this preflight's table of parser operators"))
        return
    if not facts.target.at_least(op.since):
        found.operators.append((FAIL, f"{node.op_type} needs TensorRT {op.since[0]}.{op.since[1]}"))
    # The support matrix lists the types of the operator's data; Constant's are its output's, and
    # a Cast's target type must be one TensorRT has too.
    values = list(node.output) if node.op_type in ("Constant", "ConstantOfShape", "Cast") else []
    for value in [_input(node, op.data_input), *values]:
        kind = _type_name(facts, value)
        if kind is not None and kind not in op.types:
            found.dtypes.append((FAIL, f"{node.op_type} on {kind} (parser: {', '.join(op.types)})"))
    check = RULES.get(node.op_type)
    if check is not None:
        where = f"{node.op_type} {node.name}".strip()
        found.restrictions += [(status, f"{where}: {detail}") for status, detail in check(node, facts)]


def _check_value_types(model: onnx.ModelProto, facts: GraphFacts, found: _Findings) -> None:
    boundary = {v.name for v in (*model.graph.input, *model.graph.output)}
    for value in facts.types:
        kind = _type_name(facts, value)
        if kind == "DOUBLE":
            found.dtypes.append((WARN, f"{value} is DOUBLE; TensorRT casts it to FP32"))
        elif kind == "UINT8" and value not in boundary:
            found.dtypes.append((FAIL, f"{value} is UINT8 inside the network; TensorRT takes UINT8 only as an input or output"))


def check_graph(
    path: Path, entry: dict[str, Any], target: TrtTarget, batch: tuple[int, int, int], batch_name: str,
    plugin_version: str | None = None,
) -> list[PreflightRow]:
    """Every check of one graph file; ``batch`` is the (min, opt, max) profile to be built and
    ``plugin_version`` the MultiscaleDeformableAttnPlugin_TRT version the build binds (None: the node's)."""
    name = path.stem
    model = _load(path)
    facts = _facts(model, target)
    plugins = plugin_rules()
    found = _Findings()
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx"):
            _check_node(node, facts, found)
        elif (plugin := plugins.get((node.domain, node.op_type))) is not None:
            _check_plugin_node(node, plugin, facts, plugin_version, found)
        else:
            found.plugins.append((FAIL, f"{node.domain}::{node.op_type} is not a plugin this project builds"))
    _check_value_types(model, facts, found)

    def row(check: str, problems: Sequence[tuple[str, str]], ok: str) -> PreflightRow:
        return PreflightRow(name, check, *_summary(problems, ok))

    limit = _max_opset(target)
    opset = [] if 9 <= facts.opset <= limit else [(FAIL, f"opset {facts.opset} outside 9..{limit}")]
    counts = f"{len(model.graph.node)} nodes, {len({n.op_type for n in model.graph.node})} operator types"
    return [
        row("opset", opset, f"opset {facts.opset} (parser: 9..{limit})"),
        row("operators", found.operators, counts),
        row("dtypes", found.dtypes, "every operator on a type the parser takes"),
        row("restrictions", found.restrictions, "none of the documented operator limits hit"),
        _dynamic_dims(name, model, entry, batch, batch_name),
        _size(name, path, model),
        row("plugins", found.plugins, ", ".join(sorted(found.used_plugins)) or "none"),
    ]


def _dynamic_dims(name: str, model: onnx.ModelProto, entry: dict[str, Any], batch: tuple[int, int, int],
                  batch_name: str) -> PreflightRow:
    problems = []
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and (axis != 0 or dim.dim_param != batch_name):
                problems.append(f"{value.name} dimension {axis} ({dim.dim_param}) is dynamic; profiles cover only the batch axis")
            elif not dim.dim_param and dim.dim_value <= 0:
                problems.append(f"{value.name} dimension {axis} has no size")
    low, opt, high = batch
    if not 1 <= low <= opt <= high:
        problems.append(f"profile {batch} is not 1 <= min <= opt <= max")
    if problems:
        return PreflightRow(name, "dynamic dims", FAIL, "; ".join(problems))
    inputs = ", ".join(t["name"] for t in entry["inputs"])
    return PreflightRow(name, "dynamic dims", PASS, f"batch {low}/{opt}/{high} (min/opt/max) covers {inputs}")


PROTOBUF_LIMIT = 2**31


def _size(name: str, path: Path, model: onnx.ModelProto) -> PreflightRow:
    size = path.stat().st_size
    external = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
    missing = sorted(f for f in external if not (path.parent / f).is_file())
    weights = sum((path.parent / f).stat().st_size for f in external if f not in missing)
    if size >= PROTOBUF_LIMIT:
        return PreflightRow(name, "size", FAIL, f"{path.name} is {size / 2**30:.2f} GiB; protobuf stops at 2 GiB (use external data)")
    if missing:
        return PreflightRow(name, "size", FAIL, f"external data missing: {', '.join(missing)}")
    detail = f"{size / 2**20:.1f} MiB graph" + (f" + {weights / 2**20:.1f} MiB external data" if external else "")
    return PreflightRow(name, "size", PASS, detail)


def preflight(
    onnx_dir: str | Path, target: TrtTarget, batch: tuple[int, int, int], plugin_version: str | None = None
) -> list[PreflightRow]:
    """Check every graph of an export directory; a first row says which release the rules are for."""
    directory = Path(onnx_dir)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise PreflightError(f"{exc}; pass the output directory of `deris-export onnx`") from None
    known = (target.major, target.minor) in KNOWN_RELEASES
    newest = TrtTarget(*KNOWN_RELEASES[-1])
    rules_for = target if known or target < newest else newest
    head = PreflightRow(
        "*", "target", PASS if known else WARN,
        f"TensorRT {target}" if known else
        f"TensorRT {target} is outside the preflight's table ({KNOWN_RELEASES[0][0]}.{KNOWN_RELEASES[0][1]}..{newest}); "
        f"checked with {rules_for}'s rules",
    )
    if batch[2] > manifest["batch"]["max"]:
        raise PreflightError(f"--max-batch {batch[2]} is above the export's batch limit {manifest['batch']['max']}")
    rows = [head]
    for entry in manifest["graphs"].values():
        rows += check_graph(directory / entry["file"], entry, rules_for, batch, manifest["batch"]["name"], plugin_version)
    return rows


def failed(rows: Sequence[PreflightRow]) -> list[PreflightRow]:
    return [row for row in rows if row.status == FAIL]


def format_preflight(rows: Sequence[PreflightRow]) -> str:
    """A fixed-width table: one row per (graph, check)."""
    table = [("graph", "check", "result", "detail")] + [(r.graph, r.check, r.status, r.detail) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths)), row[3]]).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in (*widths, len("detail"))))
    return "\n".join(lines)
