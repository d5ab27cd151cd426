"""``--msda triton-plugin``: this project's fused MSDA Triton kernel inside TensorRT engines.

The deformable layers export as one ``deris::msda_fused`` node each, which TensorRT's ONNX parser
(>= 10.9) binds to the ahead-of-time Quickly Deployable Plugin defined here:

* the node follows the parser's plugin contract: op type = plugin name, string attribute
  ``plugin_namespace``, integer attribute ``aot`` = 1 (take the AOT implementation);
* inputs are those of the fused kernel: value [B,S,H,D], the level table [L,3] INT32 (height,
  width, first key), reference points [B,Q,L,2], sampling offsets [B,Q,H,L,P,2] (pixels),
  attention logits [B,Q,H,L*P] (before the softmax), all float32 -> [B,Q,H,D] float32. The
  softmax and the location arithmetic run inside the kernel;
* at engine build time ``aot_impl`` returns the PTX Triton compiles from
  :func:`deris.kernels.ms_deform_attn` 's fused forward kernel for the engine's GPU, with the launch
  configuration the PyTorch launcher uses (read from a planned launch, not restated here). The
  engine then holds the kernel and needs no Python at inference (``trtexec``, Triton Inference
  Server's tensorrt backend).

TensorRT's AOT launcher passes input pointers, then extra int scalars, then output pointers. The
kernel takes ``out_ptr`` before its ints (``num_keys``, ``num_queries`` and the autotuning key
``query_bucket``), so they are compiled in as constants instead (every dimension but the batch is static in these engines): the entry then
takes exactly the six pointers, and no extra scalars are passed. Triton (>= 3.3) appends two hidden
pointers to every kernel entry (global and profile scratch); TensorRT would not pass them, so they
are removed from the PTX entry after checking that the kernel never reads them.

On CPU the node runs in ONNX Runtime through an onnxruntime-extensions kernel computing the
project's reference (:func:`register_ort_kernel`), so exported graphs are verified like the others.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the annotations of the
decorated functions as classes (``inspect.signature`` + ``issubclass``), not as strings.
"""

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar

import torch

from deris.kernels.ms_deform_attn import as_shape_list, ms_deform_attn_fused_reference

if TYPE_CHECKING:
    import tensorrt.plugin as trtp

PLUGIN_NAMESPACE = "deris"
PLUGIN_NAME = "msda_fused"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# The parser reads these two; they are not plugin fields. ONNX has no bool attribute: aot is an int.
ONNX_ATTRIBUTES: dict[str, Any] = {"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1}
NUM_INPUTS, NUM_OUTPUTS = 5, 1
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}


def level_rows(spatial_shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The kernel's level table: (height, width, first key) per level."""
    rows, start = [], 0
    for height, width in spatial_shapes:
        rows.append((height, width, start))
        start += height * width
    return rows


# --- the PyTorch side: a custom op that exports as the plugin node ---------------------------------


@torch.library.custom_op("deris_export::msda_triton_plugin", mutates_args=())
def msda_triton_plugin(
    value: torch.Tensor,
    levels: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """The plugin's computation in PyTorch (the reference): its inputs as the node takes them -> [B,Q,H,D]."""
    batch, _, heads, head_dim = value.shape
    shapes = as_shape_list(levels[:, :2])
    out: torch.Tensor = ms_deform_attn_fused_reference(
        value, shapes, None, reference_points, sampling_offsets, attention_logits
    )
    return out.view(batch, -1, heads, head_dim)


@msda_triton_plugin.register_fake
def _msda_triton_plugin_fake(
    value: torch.Tensor,
    levels: torch.Tensor,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_offsets.shape[1], heads, head_dim)


def msda_fused(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]] | torch.Tensor,
    level_start_index: torch.Tensor | None,
    reference_points: torch.Tensor,
    sampling_offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """``ms_deform_attn_fused`` as the triton-plugin export computes it (the pixel decoder's
    signature), in float32 whatever the graph's precision, like the other representations."""
    table = torch.tensor(level_rows(as_shape_list(spatial_shapes)), dtype=torch.int32, device=value.device)
    out: torch.Tensor = msda_triton_plugin(
        value.float(), table, reference_points.float(), sampling_offsets.float(), attention_logits.float()
    )
    return out.flatten(2).to(value.dtype)


@functools.cache
def _register_schema() -> None:
    """The dynamo exporter only emits ops whose ONNX schema is known; register the node's."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_NAME, PLUGIN_NAMESPACE):
        return
    param = OpSchema.FormalParameter
    names = ("value", "levels", "reference_points", "sampling_offsets", "attention_logits")
    onnx.defs.register_schema(
        OpSchema(
            PLUGIN_NAME,
            PLUGIN_NAMESPACE,
            1,
            inputs=[param(name, "I" if name == "levels" else "T") for name in names],
            outputs=[param("output", "T")],
            type_constraints=[("T", ["tensor(float)"], ""), ("I", ["tensor(int32)"], "")],
            attributes=[
                OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "", required=False),
                OpSchema.Attribute("aot", OpSchema.AttrType.INT, "", required=False),
            ],
        )
    )


def custom_translation_table() -> dict[Any, Callable[..., Any]]:
    """``custom_translation_table`` entry for ``torch.onnx.export``: the custom op -> the plugin node."""
    import onnxscript

    _register_schema()
    opset = onnxscript.values.Opset(PLUGIN_NAMESPACE, 1)

    def plugin_node(value: Any, levels: Any, reference_points: Any, sampling_offsets: Any, attention_logits: Any) -> Any:
        return getattr(opset, PLUGIN_NAME)(value, levels, reference_points, sampling_offsets, attention_logits,
                                           **ONNX_ATTRIBUTES)

    return {torch.ops.deris_export.msda_triton_plugin.default: plugin_node}


@functools.cache
def register_ort_kernel() -> None:
    """Let ONNX Runtime sessions with onnxruntime-extensions' library run the node on CPU."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    floats = PyCustomOpDef.dt_float

    @onnx_op(
        op_type=PLUGIN_ID,
        inputs=[floats, PyCustomOpDef.dt_int32, floats, floats, floats],
        outputs=[floats],
        # Declared attributes must be present on every node; the exporter always writes both.
        attrs={"plugin_namespace": PyCustomOpDef.dt_string, "aot": PyCustomOpDef.dt_int64},
    )
    def _plugin_on_cpu(value: Any, levels: Any, reference_points: Any, sampling_offsets: Any, attention_logits: Any,
                       **_attrs: Any) -> Any:
        with torch.inference_mode():
            arrays = (value, levels, reference_points, sampling_offsets, attention_logits)
            out = msda_triton_plugin(*(torch.from_numpy(a) for a in arrays))
        return out.numpy()


# --- the kernel, compiled ahead of time ------------------------------------------------------------


@dataclass(frozen=True)
class MsdaShape:
    """Every static size of one plugin node (the batch is the engine's dynamic axis). The level
    sizes are data of the level table, which the kernel reads at run time: they are not needed."""

    num_keys: int
    num_queries: int
    heads: int
    head_dim: int
    levels: int
    points: int


def plan_launch(shape: MsdaShape, batch: int, multiprocessors: int = 132) -> Any:
    """The fused forward launch the PyTorch launcher makes for ``shape`` at ``batch`` with autotuning
    off: its kernel, grid, arguments (meta tensors) and meta-parameters (a
    ``kernels._triton_support.Launch``).

    Adapter until ``deris.kernels`` plans single launches publicly: the operator's body runs on
    meta tensors inside ``planning_only``, as ``deris.kernels.aot.plan_launches`` does for its fixed
    shapes. ``multiprocessors`` is the SM count launchers may size grids by (the MSDA ones do not).
    """
    from deris.kernels import _triton_support
    from deris.kernels.ms_deform_attn import _msda_fused_forward

    meta = torch.device("meta")
    b, q, h, levels = batch, shape.num_queries, shape.heads, shape.levels

    def tensor(*size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.float32, device=meta)

    # The level sizes are data the kernel reads at run time (the level table); 1 x 1 placeholders
    # plan its variant for any sizes (NARROW: levels one pixel wide allowed).
    placeholder_levels = [1, 1] * levels
    planned: list[Any] = []
    with _triton_support.planning_only(planned.append, multiprocessors):
        _msda_fused_forward(tensor(b, shape.num_keys, h, shape.head_dim), placeholder_levels, tensor(b, q, levels, 2),
                            tensor(b, q, h, levels, shape.points, 2), tensor(b, q, h, levels * shape.points))
    # The launcher records its fixed configuration first, then the rest of the autotuning space:
    # an engine has no autotuner, it takes the fixed one.
    return planned[0]


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # the PTX entry
    ptx: str  # with the entry taking the kernel's pointers only
    num_warps: int
    shared: int  # bytes of dynamic shared memory per program
    grid_x: int  # programs along the queries (independent of the batch)


def _hidden_parameters_removed(ptx: str, name: str, keep: int) -> str:
    """The PTX with the entry's parameters after the first ``keep`` removed; they must be unread."""
    entry = re.search(rf"\.entry\s+{re.escape(name)}\(([^)]*)\)", ptx)
    if entry is None:
        raise RuntimeError(f"no .entry {name} in the PTX Triton produced")
    params = entry.group(1).split(",")
    body = ptx[entry.end():]
    for index in range(keep, len(params)):
        if re.search(rf"\b{re.escape(name)}_param_{index}\b", body):
            raise RuntimeError(f"{name} reads its hidden parameter {index}; TensorRT's AOT launcher cannot pass it")
    return ptx[:entry.start(1)] + ",".join(params[:keep]) + "\n" + ptx[entry.end(1):]


@functools.cache  # every deformable layer of a graph has the same shape
def compile_kernel(shape: MsdaShape, capability: int) -> CompiledKernel:
    """The fused forward kernel compiled by Triton for ``sm_<capability>`` as TensorRT launches it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deris.kernels._triton_support import INTERPRETING

    if INTERPRETING:
        # The kernels were defined for the interpreter, and the launcher would plan its block sizes.
        raise RuntimeError("the Triton kernels were defined for Triton's interpreter (TRITON_INTERPRET is set); "
                           "build engines with --msda triton-plugin in a process without it")
    launch = plan_launch(shape, batch=1)
    kernel = launch.kernel
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    pointers = 0
    for index, param in enumerate(kernel.params):
        key = (index,)
        if param.is_constexpr:
            signature[param.name], constexprs[key] = "constexpr", launch.meta[param.name]
            continue
        argument = launch.args[index]
        if isinstance(argument, torch.Tensor):
            signature[param.name] = "*" + TRITON_TYPES[argument.dtype]
            # 16-byte aligned, as the launcher's binder takes PyTorch's buffers to be (its vector
            # loads rely on it); that TensorRT aligns plugin buffers so too is checked only on a GPU.
            attrs[key] = [["tt.divisibility", 16]]
            pointers += 1
        else:  # an int the launcher passes: a constant of the engine (see the module docstring)
            signature[param.name], constexprs[key] = "constexpr", int(argument)
    if pointers != NUM_INPUTS + NUM_OUTPUTS:
        raise RuntimeError(f"{kernel.fn.__name__} takes {pointers} pointers; the plugin has "
                           f"{NUM_INPUTS} inputs and {NUM_OUTPUTS} output")
    options = {name: value for name, value in launch.meta.items() if name not in signature}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options=options)
    metadata = compiled.metadata
    if metadata.global_scratch_size or metadata.profile_scratch_size:
        raise RuntimeError(f"{metadata.name} needs Triton scratch memory, which TensorRT's AOT launcher does not provide")
    return CompiledKernel(
        metadata.name, _hidden_parameters_removed(compiled.asm["ptx"], metadata.name, pointers), metadata.num_warps,
        metadata.shared, launch.grid[0],
    )


class Dimension(Protocol):
    """An int, or TensorRT's symbolic dimension expression (``tensorrt.plugin.ShapeExpr``)."""

    def __mul__(self, other: int, /) -> Self: ...


D = TypeVar("D", bound=Dimension)


@dataclass(frozen=True)
class LaunchDims(Generic[D]):
    """A launch's grid, block and shared memory, with the batch-dependent size of type ``D``."""

    grid_x: int
    grid_y: D
    block_x: int
    shared_mem: int


def launch_dims(batch: D, shape: MsdaShape, kernel: CompiledKernel) -> LaunchDims[D]:
    """The launcher's grid as a function of the batch: (programs along the queries, batch * heads)."""
    return LaunchDims(kernel.grid_x, batch * shape.heads, kernel.num_warps * 32, kernel.shared)


# --- the TensorRT plugin definitions ---------------------------------------------------------------


@functools.cache
def register_tensorrt_plugin() -> None:
    """Define the ``deris::msda_fused`` QDP (needs TensorRT >= 10.9 and a GPU at build time)."""
    import tensorrt.plugin as trtp

    from deris.export.tensorrt_build import compute_capability

    @trtp.register(PLUGIN_ID)
    def _describe(
        value: trtp.TensorDesc,
        levels: trtp.TensorDesc,
        reference_points: trtp.TensorDesc,
        sampling_offsets: trtp.TensorDesc,
        attention_logits: trtp.TensorDesc,
    ) -> trtp.TensorDesc:
        # [B, Q, H, D]: the batch and heads of value, the queries of the offsets.
        dims = value.shape_expr
        return trtp.from_shape_expr((dims[0], sampling_offsets.shape_expr[1], dims[2], dims[3]), dtype=value.dtype)

    @trtp.autotune(PLUGIN_ID)
    def _formats(
        value: trtp.TensorDesc,
        levels: trtp.TensorDesc,
        reference_points: trtp.TensorDesc,
        sampling_offsets: trtp.TensorDesc,
        attention_logits: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        # Exactly the types of the exported node, row-major.
        return [trtp.AutoTuneCombination("FP32, INT32, FP32, FP32, FP32, FP32", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _compile(
        value: trtp.TensorDesc,
        levels: trtp.TensorDesc,
        reference_points: trtp.TensorDesc,
        sampling_offsets: trtp.TensorDesc,
        attention_logits: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        shape = shape_from_descs(value, levels, sampling_offsets)
        kernel = compile_kernel(shape, compute_capability())
        dims = launch_dims(value.shape_expr[0], shape, kernel)
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y = dims.grid_x, dims.grid_y
        params.block_x, params.shared_mem = dims.block_x, dims.shared_mem
        return kernel.name, kernel.ptx, params, trtp.SymIntExprs(0)


def shape_from_descs(value: "trtp.TensorDesc", levels: "trtp.TensorDesc", sampling_offsets: "trtp.TensorDesc") -> MsdaShape:
    """The static sizes from the plugin's tensor descriptors (all but the batch are build-time constants)."""
    keys, heads, head_dim = (value.shape_expr[i].constant_value() for i in (1, 2, 3))
    queries, points = sampling_offsets.shape_expr[1].constant_value(), sampling_offsets.shape_expr[4].constant_value()
    return MsdaShape(keys, queries, heads, head_dim, levels.shape_expr[0].constant_value(), points)
